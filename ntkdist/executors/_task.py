"""The tile task: a module-level function of (tile, frozen spec), idempotent.

Runs on a worker (or in-process for the serial executor). It reads the two
input blocks from Zarr, pads a ragged block to the full tile so every tile of
a job has one shape (one compilation per worker), computes the tile, writes
it (and its mirror) and returns the checksums. It never writes markers or
attributes: the coordinator records completion.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import zarr

from .._model import Model
from .._planner import Tile
from .._precision import DEFAULT as DEFAULT_PRECISION, matmul_precision
from ..kernels import AbstractKernelStrategy
from ..storage import write_tile
from ._factors import tile_block


@dataclasses.dataclass(frozen=True)
class InputSource:
    """Where workers read an input: a Zarr array ``path`` inside store ``root``."""

    root: str
    path: str


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Everything a tile task needs besides the model and params.

    Attributes:
        store: root of the kernel store.
        x1: where ``x1`` is read.
        x2: where ``x2`` is read (``None``: symmetric, ``x2 = x1``).
        output: the output form.
        strategy: the strategy instance (frozen, hashable).
        tile_rows: tile side along ``x1`` (ragged blocks are padded to it).
        tile_cols: tile side along ``x2``.
        dtype: the kernel dtype.
        fingerprint: the job's fingerprint (names worker caches and task keys).
        model_key: hash of what the model computes; a worker reuses the first
            model object it saw with this key, so later jobs hit the same
            compiled functions instead of compiling again.
        cache: where blocks' factors are kept between tiles: ``"none"``,
            ``"memory"`` or ``"store"`` (see ``ntkdist.executors._factors``).
        cache_bytes: capacity of each worker's factor cache.
        precision: the matmul precision the job computes at (see
            ``ntkdist._precision``).
    """

    store: str
    x1: InputSource
    x2: InputSource | None
    output: str
    strategy: AbstractKernelStrategy
    tile_rows: int
    tile_cols: int
    dtype: str
    fingerprint: str
    model_key: str = ""
    cache: str = "none"
    cache_bytes: float = 0.0
    precision: str = DEFAULT_PRECISION


_lock = threading.Lock()
_arrays: OrderedDict[tuple[str, ...], zarr.Array] = OrderedDict()
# Open arrays a worker keeps (the kernel and the inputs of recent jobs).
ARRAY_CACHE_SIZE = 8
_models: OrderedDict[str, Model] = OrderedDict()
# Models a worker keeps so that repeated jobs reuse their compilations.
MODEL_CACHE_SIZE = 8


def canonical_model(key: str, model: Model) -> Model:
    """The first model seen with ``key`` (same jaxpr and constants), else ``model``.

    Jitted tile functions take the model as a static argument, hashed by the
    identity of ``apply_fn``; each job's model arrives as a new object, so
    without this every job would compile again.
    """
    if not key:
        return model
    with _lock:
        if key not in _models:
            _models[key] = model
            while len(_models) > MODEL_CACHE_SIZE:
                _models.popitem(last=False)
        _models.move_to_end(key)
        return _models[key]


def _array(root: str, path: str, mode: str, job: str) -> zarr.Array:
    key = (root, path, mode, job)
    with _lock:
        if key not in _arrays:
            # Tiles are never all NaN (the fill), so skip zarr's emptiness scan.
            config = {"write_empty_chunks": True} if mode != "r" else None
            _arrays[key] = zarr.open_array(
                store=root, path=path, mode=mode, config=config
            )
            while len(_arrays) > ARRAY_CACHE_SIZE:
                _arrays.popitem(last=False)
        return _arrays[key]


def read_block(
    src: InputSource, rows: tuple[int, int], size: int, job: str = ""
) -> np.ndarray:
    """Rows ``[start, stop)`` of an input, padded to ``size`` by repeating the last.

    Padding rows are real samples, so no model sees inputs it could not
    handle; their kernel entries are cut away before writing.
    """
    x = np.asarray(_array(src.root, src.path, "r", job)[rows[0] : rows[1]])
    if len(x) < size:
        x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
    return x


def compute_block(tile: Tile, spec: TileSpec, model: Model, params: Any) -> np.ndarray:
    """The kernel block of ``tile`` as a numpy array of the kernel's dtype.

    Both blocks' factors come from the worker's cache, the job's factor
    store or a fresh factor pass (``spec.cache``), on blocks padded to the
    full tile so every tile has one shape; one jitted contraction makes the
    tile. The values do not depend on where the factors came from.
    """
    k = tile_block(tile, spec, model, params)
    r, c = tile.shape
    return np.asarray(k)[:r, :c].astype(spec.dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class ByValue:
    """``(model, params)`` pickled by value on the client, with cloudpickle.

    distributed pickles scattered data by reference, so a model defined in a
    file the workers cannot import (``ntkdist compute path/model.py:factory``)
    would fail to load there. Pickling it here, by value, ships its code too.
    """

    data: bytes
    digest: str

    @classmethod
    def of(cls, model: Model, params: Any) -> ByValue:
        """Serialise ``(model, params)``, remembering a digest for the cache."""
        import hashlib

        import cloudpickle

        data = cloudpickle.dumps((model, params))
        return cls(data, hashlib.sha256(data).hexdigest())


COMPUTE_SLOT = threading.Semaphore(1)
_loaded: OrderedDict[str, tuple[Model, Any]] = OrderedDict()
_loaded_lock = threading.Lock()


def _load(payload: ByValue | tuple[Model, Any]) -> tuple[Model, Any]:
    """Unpickle a payload once per worker process (later tasks reuse it)."""
    if not isinstance(payload, ByValue):
        return payload
    import pickle

    with _loaded_lock:
        if payload.digest not in _loaded:
            _loaded[payload.digest] = pickle.loads(payload.data)
            while len(_loaded) > 4:
                _loaded.popitem(last=False)
        return _loaded[payload.digest]


def run_tile(
    tile: Tile, spec: TileSpec, model_params: ByValue | tuple[Model, Any]
) -> tuple[int, int]:
    """Compute one tile and write it (and its mirror); return the checksums.

    Idempotent: run twice, it writes the same bytes, so retries are safe.
    """
    model, params = _load(model_params)
    model = canonical_model(spec.model_key, model)
    # One tile computes at a time per process (it has every core, or the
    # process's one accelerator); a second worker thread writes the previous
    # tile meanwhile, so the write overlaps the next compute.
    with COMPUTE_SLOT, matmul_precision(spec.precision):
        block = compute_block(tile, spec, model, params)
    kernel = _array(spec.store, "kernel", "r+", spec.fingerprint)
    return write_tile(kernel, tile, block, spec.output)
