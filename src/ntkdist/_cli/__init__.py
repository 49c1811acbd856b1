"""The ``ntkdist`` command line: parsing and printing only.

``_engine`` (compute, plan, status, verify; the parser and ``main``),
``_consume`` (ridge, spectrum on stored kernels), ``_bench`` (the benchmark
suite), ``_load`` (the model factory and input files a command names).
"""

from ._engine import (
    EXIT_ERROR as EXIT_ERROR,
    EXIT_PROBLEMS as EXIT_PROBLEMS,
    build_parser as build_parser,
    main as main,
    script as script,
)
from ._load import (
    canonical_model_spec as canonical_model_spec,
    load_input as load_input,
    load_model as load_model,
)
