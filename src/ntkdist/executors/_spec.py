"""What a tile task is given besides the tile: the frozen job spec."""

from __future__ import annotations

import dataclasses

from .._precision import DEFAULT as DEFAULT_PRECISION
from ..kernels import AbstractKernelStrategy


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
            ``"memory"`` or ``"store"`` (see :mod:`ntkdist.executors._factors`).
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
