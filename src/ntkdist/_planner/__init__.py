"""The planner: pure Python (no jax, dask or zarr), printable, JSON round-trip."""

from ._budget import (
    CostModel as CostModel,
    format_bytes as format_bytes,
    largest_tile_within as largest_tile_within,
    parse_bytes as parse_bytes,
)
from ._plan import CACHE_LEVELS as CACHE_LEVELS, Plan as Plan, make_plan as make_plan
from ._tiling import Tile as Tile, n_blocks as n_blocks, tiles as tiles
