"""``ntk_fn``: a reusable kernel function, validated and planned once per shape.

``ntkdist.ntk`` validates its arguments, checks the model, models every
strategy's cost and traces on every call: right for one kernel, wasteful for
many small tiles. ``ntk_fn`` does that work on the first call for each
combination of parameter and input shapes, keeps the chosen strategy's jitted
tile function, and afterwards only calls it (the convention of
neural-tangents' ``empirical_ntk_fn``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _inputs
from ._model import ApplyFn, Model, as_model
from ._precision import (
    DEFAULT as DEFAULT_PRECISION,
    check as check_precision,
    matmul_precision,
)
from ._units import parse_bytes
from .kernels import AbstractKernelStrategy
from .kernels._base import _symmetrize, _tile
from .kernels._choose import run_first

KernelFn = Callable[..., jax.Array]


def _signature(params: Any, x1: Any, x2: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    avals = tuple((tuple(jnp.shape(v)), str(jnp.result_type(v))) for v in leaves)
    xs = tuple(
        None if x is None else (tuple(jnp.shape(x)), str(jnp.result_type(x)))
        for x in (x1, x2)
    )
    return (treedef, avals, xs)


def _concrete(*trees: Any) -> bool:
    return not any(
        isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(trees)
    )


def ntk_fn(
    apply_fn: ApplyFn | Model,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    memory_budget: Any = None,
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> KernelFn:
    """A kernel function ``fn(params, x1, x2=None) -> jax.Array``, to call many times.

    The first call for each combination of parameter and input shapes and dtypes
    validates the arguments and the model as :func:`ntkdist.ntk` does, picks the
    strategy (``auto``: the cheapest predicted that can compute the model) and
    compiles it; later calls with the same shapes go straight to the compiled
    tile function, with no validation, cost modelling or re-tracing. The result
    stays a ``jax.Array`` on the device (``ntk`` returns numpy).

    ``fn`` can be called inside ``jax.jit`` too; there, values cannot be inspected,
    so only shapes are checked (the NaN and sample-independence checks need
    concrete values and run on the first call outside a trace).

    Args:
        apply_fn: ``apply_fn(params, x) -> [n, O]``, as for :func:`ntkdist.ntk`.
        output, strategy, memory_budget, check_finite, check_independence,
            integer_inputs, precision: as for :func:`ntkdist.ntk`.

    Returns:
        ``fn(params, x1, x2=None)``: the kernel between ``x1`` and ``x2``
        (``None``: ``x1``, exactly symmetric).

    Example:
        >>> import jax.numpy as jnp, ntkdist
        >>> f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> p = {"w1": jnp.ones((3, 4)) / 2, "w2": jnp.ones((4, 2)) / 2}
        >>> kernel = ntkdist.ntk_fn(f, output="trace")
        >>> kernel(p, jnp.ones((5, 3)), jnp.ones((2, 3))).shape
        (5, 2)
    """
    _inputs.check_output(output)
    _inputs.check_strategy(strategy)
    check_precision(precision)
    budget = parse_bytes(memory_budget)
    model = as_model(apply_fn)
    cache: dict[tuple[Any, ...], AbstractKernelStrategy] = {}
    lock = threading.Lock()

    def prepare(params: Any, x1: Any, x2: Any) -> None:
        concrete = _concrete(params, x1, x2)
        if concrete:
            _inputs.check_params(params, check_finite=check_finite)
        for x, name in ((x1, "x1"), (x2, "x2")):
            if x is not None:
                _inputs.as_inputs(
                    x,
                    name,
                    integer_inputs=integer_inputs,
                    check_finite=check_finite and concrete,
                )
        _inputs.check_pair(x1, x2)
        _inputs.check_model(
            model, params, x1, independence=check_independence and concrete
        )

    def run(strategy: AbstractKernelStrategy, params: Any, x1: Any, x2: Any) -> Any:
        k = _tile(strategy, model, output, params, x1, x2)
        return k if x2 is not None else _symmetrize(k, output)

    def fn(params: Any, x1: Any, x2: Any | None = None) -> jax.Array:
        x1 = jnp.asarray(x1)
        x2 = None if x2 is None else jnp.asarray(x2)
        key = _signature(params, x1, x2)
        with matmul_precision(precision):
            chosen = cache.get(key)
            if chosen is not None:
                return run(chosen, params, x1, x2)
            with lock:
                prepare(params, x1, x2)
                chosen, k = run_first(
                    strategy,
                    model,
                    params,
                    x1,
                    x2,
                    output,
                    budget,
                    lambda s: run(s, params, x1, x2),
                )
                cache[key] = chosen
                return k

    return fn
