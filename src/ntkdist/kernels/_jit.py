"""The jitted halves of a tile, as workers run them: factors, then contraction.

A tile ``(i, j)`` is ``contract(factors(x1[i]), factors(x2[j]))``. Every
engine path (fresh factors, a worker's cache, the factor store) runs these
same two compiled functions, so a kernel's bytes do not depend on where the
factors came from. ``AbstractKernelStrategy.tile`` is the in-memory path.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .._model import Model
from ._base import AbstractKernelStrategy, _symmetrize


def _factors_impl(
    strategy: AbstractKernelStrategy, model: Model, output: str, params: Any, x: Any
) -> Any:
    return strategy.factors(model, params, x, output)


def _contract_impl(
    strategy: AbstractKernelStrategy,
    model: Model,
    output: str,
    params: Any,
    f1: Any,
    f2: Any,
) -> jax.Array:
    return strategy.contract(model, params, f1, f2, output)


factors_fn = jax.jit(_factors_impl, static_argnums=(0, 1, 2))
contract_fn = jax.jit(_contract_impl, static_argnums=(0, 1, 2))


def tile_from_factors(
    strategy: AbstractKernelStrategy,
    model: Model,
    output: str,
    params: Any,
    f1: Any,
    f2: Any | None,
) -> jax.Array:
    """The tile between two blocks' factors (``f2=None``: a symmetric diagonal tile)."""
    if f2 is None:
        return _symmetrize(contract_fn(strategy, model, output, params, f1, f1), output)
    return contract_fn(strategy, model, output, params, f1, f2)


def factor_layout(
    strategy: AbstractKernelStrategy,
    model: Model,
    output: str,
    params: Any,
    x: Any,
) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    """Tree structure and ``(shape, dtype)`` of each factor of the inputs ``x``
    (an array or a ``jax.ShapeDtypeStruct``), from shapes alone: nothing runs."""
    out = jax.eval_shape(
        lambda p, v: factors_fn(strategy, model, output, p, v), params, x
    )
    leaves, treedef = jax.tree_util.tree_flatten(out)
    return treedef, [(tuple(a.shape), np.dtype(a.dtype)) for a in leaves]


def factor_bytes_per_sample(
    strategy: AbstractKernelStrategy,
    model: Model,
    params: Any,
    x_shape: tuple[int, ...],
    x_dtype: Any,
    output: str,
) -> float:
    """Bytes of one sample's factors (from shapes alone: nothing runs).

    Factors are per sample, along the first axis of every leaf, so one trace
    of two samples tells; a layout that does not show it is traced again at
    one sample, and the difference taken.
    """

    def layout(n: int) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
        x = jax.ShapeDtypeStruct((n, *x_shape), x_dtype)
        return factor_layout(strategy, model, output, params, x)[1]

    def size(shapes: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)

    two = layout(2)
    if all(shape[:1] == (2,) for shape, _ in two):
        return size(two) / 2
    return float(size(two) - size(layout(1)))


def buffer_bytes(compiled: Any) -> float | None:
    """Bytes of a compiled program's buffers as XLA assigned them (arguments,
    temporaries and outputs, less outputs aliasing arguments); ``None`` where
    the backend reports no assignment."""
    try:
        m = compiled.memory_analysis()
    except NotImplementedError:
        return None
    if m is None:
        return None
    return float(
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
