"""Executors: run tile tasks serially (the reference) or on Dask."""

from ._base import AbstractExecutor as AbstractExecutor
from ._dask import DaskExecutor as DaskExecutor, JaxWorkerPlugin as JaxWorkerPlugin
from ._progress import Progress as Progress
from ._serial import SerialExecutor as SerialExecutor
from ._task import (
    InputSource as InputSource,
    TileSpec as TileSpec,
    compute_block as compute_block,
    read_block as read_block,
    run_tile as run_tile,
)
