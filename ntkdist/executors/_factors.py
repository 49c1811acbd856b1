"""Factor reuse: each input block's per-sample factors are computed once.

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
    as ``memory``, and every block's factors also go to a Zarr *factor
    store* inside the kernel store (``factors/<side>``, one chunk per block,
    with a checksum marker written after the data), so they are computed
    once for the whole job, by any worker, and survive interruption. A
    block whose marker is missing or whose bytes do not match it is
    recomputed.

Every level computes the same factors with the same jitted function and
contracts them with the same jitted function, so a kernel's bytes do not
depend on the level (or on which worker computed which block).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import zarr

from .._model import Model
from ..kernels import AbstractKernelStrategy
from ..kernels._base import _symmetrize
from ..storage import checksum

if TYPE_CHECKING:
    from .._planner import Tile
    from ._task import InputSource, TileSpec

CACHE_LEVELS: tuple[str, ...] = ("none", "memory", "store")
FACTOR_GROUP = "factors"


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
    """Bytes of one sample's factors (from shapes alone: nothing runs)."""

    def size(n: int) -> int:
        x = jax.ShapeDtypeStruct((n, *x_shape), x_dtype)
        _, shapes = factor_layout(strategy, model, output, params, x)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)

    return float(size(2) - size(1))


class FactorCache:
    """A per-process least-recently-used cache of blocks' factors, bounded in bytes."""

    def __init__(self) -> None:
        """An empty cache."""
        self._items: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.computed = 0  # factor passes run in this process
        self.loaded = 0  # blocks read back from a factor store

    def get(self, key: tuple[Any, ...]) -> Any | None:
        """The factors stored under ``key``, or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple[Any, ...], value: Any, nbytes: int, limit: float) -> None:
        """Keep ``value`` unless it alone exceeds ``limit``; evict the oldest."""
        with self._lock:
            if key in self._items or nbytes > limit:
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > limit and self._items:
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n

    def forget(self, fingerprint: str) -> None:
        """Drop every block of job ``fingerprint``."""
        with self._lock:
            for key in [k for k in self._items if k[0] == fingerprint]:
                self.nbytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        """Drop everything (tests and benchmarks)."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0
            self.hits = self.misses = self.computed = self.loaded = 0


CACHE = FactorCache()


def forget_job(fingerprint: str, store: str) -> None:
    """Free what this process holds for a finished job (run on every worker)."""
    CACHE.forget(fingerprint)
    for key in [k for k in _templates if k[0] == fingerprint]:
        del _templates[key]
    with _arrays_lock:
        for key in [k for k in _arrays if k[0] == store]:
            del _arrays[key]


def _nbytes(tree: Any) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def side_name(spec: TileSpec, src: InputSource) -> str:
    """``"x1"`` or ``"x2"``: which input a block comes from (symmetric: ``x1``)."""
    return "x1" if src == spec.x1 else "x2"


# -- the Zarr factor store ---------------------------------------------------


_templates: dict[tuple[str, str, int], Any] = {}


def _template(
    spec: TileSpec, model: Model, params: Any, src: InputSource, size: int
) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    """The factor layout of one padded block of ``src`` (cached per job)."""
    from ._task import _array

    key = (spec.fingerprint, side_name(spec, src), size)
    if key not in _templates:
        arr = _array(src.root, src.path, "r", spec.fingerprint)
        dtype = jax.dtypes.canonicalize_dtype(arr.dtype)  # as jnp.asarray sees it
        x = jax.ShapeDtypeStruct((size, *arr.shape[1:]), dtype)
        _templates[key] = factor_layout(spec.strategy, model, spec.output, params, x)
    return _templates[key]


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


def create_factor_store(
    root: str, side: str, n_blocks: int, block_items: int, dtype: str
) -> None:
    """Create (or keep) the factor arrays of one input side in the kernel store.

    ``factors/<side>`` holds one chunk of ``block_items`` values per block;
    ``factors/<side>_done`` holds each block's checksum (0: not written).
    Called by the coordinator before any task runs.
    """
    group = zarr.open_group(store=root, mode="r+")
    fg = group.require_group(FACTOR_GROUP)
    if side not in fg:
        fg.create_array(
            side,
            shape=(n_blocks, block_items),
            chunks=(1, block_items),
            dtype=dtype,
            compressors=None,
            fill_value=0,
        )
        fg.create_array(
            f"{side}_done",
            shape=(n_blocks,),
            chunks=(1,),
            dtype="uint64",
            compressors=None,
            fill_value=0,
        )


_arrays: dict[tuple[str, str], zarr.Array] = {}
_arrays_lock = threading.Lock()


def _factor_array(root: str, path: str) -> zarr.Array:
    with _arrays_lock:
        key = (root, path)
        if key not in _arrays:
            _arrays[key] = zarr.open_array(
                store=root,
                path=path,
                mode="r+",
                config={"write_empty_chunks": True},
            )
        return _arrays[key]


def _load_stored(
    spec: TileSpec, side: str, block: int, treedef: Any, shapes: list[Any]
) -> Any | None:
    done = _factor_array(spec.store, f"{FACTOR_GROUP}/{side}_done")
    want = int(done[block])
    if want == 0:
        return None
    flat = np.asarray(_factor_array(spec.store, f"{FACTOR_GROUP}/{side}")[block])
    if checksum(flat) != want:
        return None  # torn or altered: recompute (and rewrite)
    leaves, start = [], 0
    for shape, dtype in shapes:
        n = math.prod(shape)
        leaves.append(flat[start : start + n].reshape(shape).astype(dtype, copy=False))
        start += n
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in leaves])


def _save_stored(spec: TileSpec, side: str, block: int, factors: Any) -> None:
    arr = _factor_array(spec.store, f"{FACTOR_GROUP}/{side}")
    flat = np.concatenate(
        [
            np.asarray(v, dtype=arr.dtype).ravel()
            for v in jax.tree_util.tree_leaves(factors)
        ]
    )
    arr[block] = flat
    _factor_array(spec.store, f"{FACTOR_GROUP}/{side}_done")[block] = checksum(flat)


# -- blocks ---------------------------------------------------------------------


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
    from ._task import read_block

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
            _save_stored(spec, side, block, f)
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
