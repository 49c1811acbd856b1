"""A validated job: model, params, inputs, the strategy, and their fingerprint."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _inputs
from ._model import ApplyFn, Model, as_model
from ._precision import DEFAULT as DEFAULT_PRECISION, current as current_precision
from ._version import __version__
from .kernels import AbstractKernelStrategy, check_supported, choose, get
from .storage import array_digest, digest, params_digest
from .storage._fingerprint import describe_array, describe_params, model_fingerprint

# Tile side at which ``strategy="auto"`` compares strategies.
NOMINAL_TILE = 256


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: model, params, inputs, and what identifies them."""

    model: Model
    params: Any
    x1: Any
    x2: Any | None
    output: str
    strategy: AbstractKernelStrategy
    out_dim: int
    dtype: str
    probe: np.ndarray
    fields: dict[str, str]
    auto: bool = False
    precision: str = DEFAULT_PRECISION
    described: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def n1(self) -> int:
        """Samples of ``x1``."""
        return int(self.x1.shape[0])

    @property
    def n2(self) -> int:
        """Samples of ``x2`` (``n1`` when symmetric)."""
        return self.n1 if self.x2 is None else int(self.x2.shape[0])


def prepare(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
) -> Job:
    """Validate the arguments once and fingerprint model, params and inputs.

    Inputs are read in row blocks (zarr and dask inputs are never loaded whole).
    Runs at the matmul precision in force (``compute`` and ``plan`` set it).

    Raises:
        InputError: an argument is malformed.
        ModelError: the model does not map ``[n, ...]`` to ``[n, O]``.
    """
    _inputs.check_output(output)
    _inputs.check_strategy(strategy)
    _inputs.check_params(params, check_finite=check_finite)
    x1 = _as_array(x1, "x1", integer_inputs)
    x2 = None if x2 is None else _as_array(x2, "x2", integer_inputs)
    _inputs.check_pair(x1, x2)
    model = as_model(apply_fn)
    probe = np.asarray(x1[: min(4, int(x1.shape[0]))])
    out_dim = _inputs.check_model(model, params, probe, independence=check_independence)
    dtype = str(np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(params), probe)))
    if strategy == "auto":
        t = min(NOMINAL_TILE, int(x1.shape[0]))
        chosen, _ = choose(model, params, jnp.asarray(probe), t, t, output, None)
    else:
        chosen = get(strategy)
        check_supported(chosen, model, params, jnp.asarray(probe), output)
    model_hash, model_words = model_fingerprint(model, params, probe[:1])
    fields = {
        "model": model_hash,
        "params": params_digest(params),
        "x1": array_digest(x1, "x1", check_finite=check_finite),
        "x2": "symmetric"
        if x2 is None
        else array_digest(x2, "x2", check_finite=check_finite),
        "output": digest(output),
        "strategy": digest(repr(chosen)),
        "dtype": digest(dtype),
        "precision": digest(current_precision()),
        "versions": digest(__version__, jax.__version__),
    }
    return Job(
        model,
        params,
        x1,
        x2,
        output,
        chosen,
        out_dim,
        dtype,
        probe,
        fields,
        auto=strategy == "auto",
        precision=current_precision(),
        described={
            "model": model_words,
            "params": describe_params(params),
            "x1": describe_array(x1),
            "x2": "symmetric" if x2 is None else describe_array(x2),
            "output": output,
            "strategy": repr(chosen),
            "dtype": dtype,
            "precision": current_precision(),
            "versions": f"ntkdist {__version__}, jax {jax.__version__}",
        },
    )


def _as_array(x: Any, name: str, integer_inputs: bool) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, jax.Array):
        x = np.asarray(x)
    return _inputs.as_inputs(x, name, integer_inputs=integer_inputs, check_finite=False)


def with_strategy(job: Job, strategy: AbstractKernelStrategy) -> Job:
    """``job`` computed with ``strategy`` (its fingerprint field follows)."""
    return dataclasses.replace(
        job,
        strategy=strategy,
        fields={**job.fields, "strategy": digest(repr(strategy))},
        described={**job.described, "strategy": repr(strategy)},
        auto=False,
    )
