"""Factor reuse on workers: each input block's per-sample factors, computed once.

A tile ``(i, j)`` is ``contract(factors(x1[i]), factors(x2[j]))``. The
factors of a block depend on that block alone, so a job with ``B`` blocks
needs ``B`` factor passes instead of two per tile. Three levels, chosen by
the planner (``Plan.cache``):

``none``
    factors are computed for every tile and dropped (for strategies whose
    factors cost nothing, or are too large to keep).
``memory``
    each worker keeps recent blocks' factors in a least-recently-used cache
    of ``cache_bytes`` (on the accelerator when there is one). Row-major tile
    order keeps a row's block hot; blocks that do not fit are recomputed.
``store``
    as ``memory``, and every block's factors also go to the factor store
    inside the kernel store (:mod:`ntkdist.storage._factors`), so they are
    computed once for the whole job, by any worker, and survive interruption.

Every level computes the same factors with the same jitted function and
contracts them with the same jitted function (:mod:`ntkdist.kernels._jit`),
so a kernel's bytes do not depend on the level (or on which worker computed
which block).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .._lru import LRU
from .._model import Model
from .._planner import Tile
from ..kernels._jit import factor_layout, factors_fn, tile_from_factors
from ..storage._factors import (
    create_factor_store,
    forget_factor_arrays,
    read_factors,
    write_factors,
)
from ._blocks import open_array, read_block
from ._spec import InputSource, TileSpec


class FactorCache:
    """A per-process least-recently-used cache of blocks' factors, bounded in bytes."""

    def __init__(self) -> None:
        """An empty cache."""
        self._lru: LRU[tuple[Any, ...], Any] = LRU()
        self.hits = 0
        self.misses = 0
        self.computed = 0  # factor passes run in this process
        self.loaded = 0  # blocks read back from a factor store

    @property
    def nbytes(self) -> int:
        """Bytes of the factors held."""
        return self._lru.nbytes

    def get(self, key: tuple[Any, ...]) -> Any | None:
        """The factors stored under ``key``, or ``None``."""
        value = self._lru.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: tuple[Any, ...], value: Any, nbytes: int, limit: float) -> None:
        """Keep ``value`` unless it alone exceeds ``limit``; evict the oldest."""
        self._lru.put(key, value, nbytes, max_bytes=limit)

    def forget(self, fingerprint: str) -> None:
        """Drop every block of job ``fingerprint``."""
        self._lru.forget(lambda key: key[0] == fingerprint)

    def clear(self) -> None:
        """Drop everything (tests and benchmarks)."""
        self._lru.clear()
        self.hits = self.misses = self.computed = self.loaded = 0


CACHE = FactorCache()
# Factor layouts of recent jobs' blocks: (fingerprint, side, size) -> layout.
_templates: LRU[tuple[str, str, int], Any] = LRU(max_items=32)


def forget_job(fingerprint: str, store: str) -> None:
    """Free what this process holds for a finished job (run on every worker)."""
    CACHE.forget(fingerprint)
    _templates.forget(lambda key: key[0] == fingerprint)
    forget_factor_arrays(store)


def _nbytes(tree: Any) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def side_name(spec: TileSpec, src: InputSource) -> str:
    """``"x1"`` or ``"x2"``: which input a block comes from (symmetric: ``x1``)."""
    return "x1" if src == spec.x1 else "x2"


def _template(
    spec: TileSpec, model: Model, params: Any, src: InputSource, size: int
) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    """The factor layout of one padded block of ``src`` (kept per job)."""

    def make() -> Any:
        arr = open_array(src.root, src.path, "r", spec.fingerprint)
        dtype = jax.dtypes.canonicalize_dtype(arr.dtype)  # as jnp.asarray sees it
        x = jax.ShapeDtypeStruct((size, *arr.shape[1:]), dtype)
        return factor_layout(spec.strategy, model, spec.output, params, x)

    return _templates.get_or_make(  # type: ignore[no-any-return]
        (spec.fingerprint, side_name(spec, src), size), make
    )


def create_factor_stores(
    spec: TileSpec, grid: tuple[int, int], model: Model, params: Any
) -> None:
    """Create the factor arrays of each input side (by the coordinator, before
    any task runs)."""
    sides = [("x1", spec.x1, spec.tile_rows, grid[0])]
    if spec.x2 is not None:
        sides.append(("x2", spec.x2, spec.tile_cols, grid[1]))
    for side, src, size, blocks in sides:
        _, shapes = _template(spec, model, params, src, size)
        items = sum(math.prod(shape) for shape, _ in shapes)
        create_factor_store(spec.store, side, blocks, items, spec.dtype)


def _load_stored(
    spec: TileSpec, side: str, block: int, treedef: Any, shapes: list[Any]
) -> Any | None:
    flat = read_factors(spec.store, side, block)
    if flat is None:
        return None  # absent, torn or altered: recompute (and rewrite)
    leaves, start = [], 0
    for shape, dtype in shapes:
        n = math.prod(shape)
        leaves.append(flat[start : start + n].reshape(shape).astype(dtype, copy=False))
        start += n
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in leaves])


def block_factors(
    spec: TileSpec,
    src: InputSource,
    block: int,
    rows: tuple[int, int],
    size: int,
    model: Model,
    params: Any,
) -> Any:
    """The factors of input block ``block`` (rows ``rows``, padded to ``size``)."""
    side = side_name(spec, src)
    key = (spec.fingerprint, side, block, size)
    if spec.cache != "none":
        hit = CACHE.get(key)
        if hit is not None:
            return hit
    f = None
    if spec.cache == "store":
        treedef, shapes = _template(spec, model, params, src, size)
        f = _load_stored(spec, side, block, treedef, shapes)
        CACHE.loaded += f is not None
    if f is None:
        x = read_block(src, rows, size, spec.fingerprint)
        f = factors_fn(spec.strategy, model, spec.output, params, x)
        CACHE.computed += 1
        if spec.cache == "store":
            write_factors(spec.store, side, block, jax.tree_util.tree_leaves(f))
    if spec.cache != "none":
        CACHE.put(key, f, _nbytes(f), spec.cache_bytes)
    return f


def tile_block(tile: Tile, spec: TileSpec, model: Model, params: Any) -> jax.Array:
    """Tile ``tile`` from its blocks' (cached, stored or fresh) factors."""
    f1 = block_factors(spec, spec.x1, tile.i, tile.rows, spec.tile_rows, model, params)
    if tile.kind == "diagonal":
        return tile_from_factors(spec.strategy, model, spec.output, params, f1, None)
    src = spec.x1 if spec.x2 is None else spec.x2
    f2 = block_factors(spec, src, tile.j, tile.cols, spec.tile_cols, model, params)
    return tile_from_factors(spec.strategy, model, spec.output, params, f1, f2)
