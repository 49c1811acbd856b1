"""What a tile task writes: a tile and its mirror, and their checksums.

The ``kernel`` chunk of block ``(i, j)`` has exactly one writer: the task of
tile ``(i, j)``, or for ``j < i`` in a symmetric job the task of ``(j, i)``,
which writes its transpose. Large chunks of a local store go through the
direct chunk writer (:mod:`ntkdist.storage._direct`), others through zarr.
"""

from __future__ import annotations

import numpy as np
import zarr

from .._outputs import mirror_axes
from .._planner import Tile
from . import _direct
from ._direct import checksum as checksum


def mirror_block(block: np.ndarray, output: str) -> np.ndarray:
    """Block ``(j, i)`` from block ``(i, j)``: ``Θ[j, i, b, a] = Θ[i, j, a, b]``."""
    return np.ascontiguousarray(_mirror_view(block, output))


def _mirror_view(block: np.ndarray, output: str) -> np.ndarray:
    return block.transpose(mirror_axes(output))


def write_tile(
    kernel: zarr.Array, tile: Tile, block: np.ndarray, output: str
) -> tuple[int, int]:
    """Write one tile (and its mirror) into ``kernel``; return their checksums.

    The second checksum is 0 unless the tile is a symmetric job's ``mirror``
    tile. Called by tasks; touches no attributes and no markers. When it
    returns, the data is in the chunk files (see
    :func:`ntkdist.storage._direct.write_chunk_file`).
    """
    block = np.asarray(block, dtype=kernel.dtype)
    (r0, _), (c0, _) = tile.rows, tile.cols
    first = _direct.write_block(kernel, r0, c0, block)
    if tile.kind != "mirror":
        return first, 0
    return first, _direct.write_block(kernel, c0, r0, _mirror_view(block, output))
