"""Tiles: the unit of work, exactly one Zarr chunk along both sample axes."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

TileKind = Literal["plain", "diagonal", "mirror"]


@dataclasses.dataclass(frozen=True, order=True)
class Tile:
    """One block ``K[rows, cols]`` of the kernel, and who owns its mirror.

    Attributes:
        i: block index along the ``x1`` axis.
        j: block index along the ``x2`` axis.
        rows: ``(start, stop)`` sample range of ``x1``.
        cols: ``(start, stop)`` sample range of ``x2``.
        kind: ``"plain"`` for a rectangular job's tile; ``"diagonal"`` for a
            symmetric job's tile with ``i == j`` (computed exactly symmetric);
            ``"mirror"`` for a symmetric job's tile with ``i < j``, whose task
            also writes block ``(j, i)`` transposed.

    Example:
        >>> Tile(0, 1, (0, 4), (4, 6), "mirror").shape
        (4, 2)
    """

    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    kind: TileKind = "plain"

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of samples this tile covers."""
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def key(self) -> str:
        """``"i.j"``, the tile's name in messages and marker listings."""
        return f"{self.i}.{self.j}"


def n_blocks(n: int, tile: int) -> int:
    """Number of tiles of size ``tile`` covering ``n`` samples (last one ragged)."""
    return math.ceil(n / tile)


def tiles(
    n1: int, n2: int, tile_rows: int, tile_cols: int, symmetric: bool
) -> tuple[Tile, ...]:
    """All tiles of an ``n1 × n2`` kernel, in row-major order.

    Row-major order finishes the kernel row block by row block, so a reader
    streaming rows (regression, spectra) can start on a partial store. A
    symmetric job (``x2=None``) lists only tiles with ``i <= j``, which
    halves the work.

    Args:
        n1: samples of ``x1``.
        n2: samples of ``x2`` (equal to ``n1`` when symmetric).
        tile_rows: tile size along ``x1``.
        tile_cols: tile size along ``x2`` (equal to ``tile_rows`` when symmetric).
        symmetric: emit the upper triangle only, with mirror ownership.

    Returns:
        The tiles; the last tile along each axis may be ragged.

    Example:
        >>> [t.key for t in tiles(5, 5, 2, 2, symmetric=True)]
        ['0.0', '0.1', '0.2', '1.1', '1.2', '2.2']
    """
    out = []
    for i in range(n_blocks(n1, tile_rows)):
        rows = (i * tile_rows, min(n1, (i + 1) * tile_rows))
        for j in range(i if symmetric else 0, n_blocks(n2, tile_cols)):
            cols = (j * tile_cols, min(n2, (j + 1) * tile_cols))
            kind: TileKind = "plain"
            if symmetric:
                kind = "diagonal" if i == j else "mirror"
            out.append(Tile(i, j, rows, cols, kind))
    return tuple(out)
