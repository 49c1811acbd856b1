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
from typing import Any

import numpy as np

from .._lru import LRU
from .._model import Model
from .._planner import Tile
from .._precision import matmul_precision
from ..storage import write_tile
from ..storage._space import WriteFault, is_fatal
from ._blocks import open_array
from ._factors import tile_block
from ._spec import TileSpec

# Models a worker keeps so that repeated jobs reuse their compilations.
MODEL_CACHE_SIZE = 8
_models: LRU[str, Model] = LRU(max_items=MODEL_CACHE_SIZE)


def canonical_model(key: str, model: Model) -> Model:
    """The first model seen with ``key`` (same jaxpr and constants), else ``model``.

    Jitted tile functions take the model as a static argument, hashed by the
    identity of ``apply_fn``; each job's model arrives as a new object, so
    without this every job would compile again.
    """
    if not key:
        return model
    return _models.get_or_make(key, lambda: model)


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
# Unpickled payloads a worker keeps (recent jobs' models and params).
_loaded: LRU[str, tuple[Model, Any]] = LRU(max_items=4)


def _load(payload: ByValue | tuple[Model, Any]) -> tuple[Model, Any]:
    """Unpickle a payload once per worker process (later tasks reuse it)."""
    if not isinstance(payload, ByValue):
        return payload
    import pickle

    return _loaded.get_or_make(payload.digest, lambda: pickle.loads(payload.data))


def run_tile(
    tile: Tile, spec: TileSpec, model_params: ByValue | tuple[Model, Any]
) -> tuple[int, int] | WriteFault:
    """Compute one tile and write it (and its mirror); return the checksums.

    Idempotent: run twice, it writes the same bytes, so retries are safe. A
    write error that no retry fixes (read-only, full, forbidden) is returned
    as a :class:`WriteFault`, not raised, so it is not retried.
    """
    block = compute_tile(tile, spec, model_params)
    if isinstance(block, WriteFault):
        return block
    return write_block(tile, spec, block)


def compute_tile(
    tile: Tile, spec: TileSpec, model_params: ByValue | tuple[Model, Any]
) -> np.ndarray | WriteFault:
    """The tile's block, computed while holding this process's compute slot."""
    try:
        model, params = _load(model_params)
        model = canonical_model(spec.model_key, model)
        # One tile computes at a time per process (it has every core, or the
        # process's one accelerator); a second thread writes the previous
        # tile meanwhile, so the write overlaps the next compute.
        with COMPUTE_SLOT, matmul_precision(spec.precision):
            return compute_block(tile, spec, model, params)
    except OSError as err:
        if is_fatal(err):
            return WriteFault.of(err)
        raise


def write_block(
    tile: Tile, spec: TileSpec, block: np.ndarray
) -> tuple[int, int] | WriteFault:
    """Write a computed block (and its mirror); return the checksums."""
    try:
        kernel = open_array(spec.store, "kernel", "r+", spec.fingerprint)
        return write_tile(kernel, tile, block, spec.output)
    except OSError as err:
        if is_fatal(err):
            return WriteFault.of(err)
        raise
