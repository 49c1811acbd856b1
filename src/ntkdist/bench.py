"""``python -m ntkdist.bench``: the benchmark suite (code in :mod:`ntkdist._bench`)."""

from ._bench._main import (
    DEFAULT_SECTIONS as DEFAULT_SECTIONS,
    SECTIONS as SECTIONS,
    __doc__ as __doc__,
    add_arguments as add_arguments,
    main as main,
    main_from_args as main_from_args,
)

if __name__ == "__main__":
    raise SystemExit(main())
