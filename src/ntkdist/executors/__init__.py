"""Executors: run tile tasks serially (the reference) or on Dask."""

from ._base import AbstractExecutor as AbstractExecutor
from ._blocks import read_block as read_block
from ._dask import DaskExecutor as DaskExecutor
from ._progress import Progress as Progress
from ._serial import SerialExecutor as SerialExecutor
from ._spec import InputSource as InputSource, TileSpec as TileSpec
from ._task import compute_block as compute_block, run_tile as run_tile
from ._workers import (
    JaxDevicePlugin as JaxDevicePlugin,
    JaxWorkerPlugin as JaxWorkerPlugin,
)
