"""Reading input blocks on a worker, through arrays it keeps open."""

from __future__ import annotations

import numpy as np
import zarr

from .._lru import LRU
from ._spec import InputSource

# Open arrays a worker keeps (the kernel and the inputs of recent jobs).
ARRAY_CACHE_SIZE = 8
_arrays: LRU[tuple[str, ...], zarr.Array] = LRU(max_items=ARRAY_CACHE_SIZE)


def open_array(root: str, path: str, mode: str, job: str) -> zarr.Array:
    """Array ``path`` of store ``root``, opened once per worker and job."""

    def make() -> zarr.Array:
        # Tiles are never all NaN (the fill), so skip zarr's emptiness scan.
        config = {"write_empty_chunks": True} if mode != "r" else None
        return zarr.open_array(store=root, path=path, mode=mode, config=config)

    return _arrays.get_or_make((root, path, mode, job), make)


def read_block(
    src: InputSource, rows: tuple[int, int], size: int, job: str = ""
) -> np.ndarray:
    """Rows ``[start, stop)`` of an input, padded to ``size`` by repeating the last.

    Padding rows are real samples, so no model sees inputs it could not
    handle; their kernel entries are cut away before writing.
    """
    x = np.asarray(open_array(src.root, src.path, "r", job)[rows[0] : rows[1]])
    if len(x) < size:
        x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
    return x
