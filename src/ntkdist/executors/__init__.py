"""Executors: run tile tasks serially (the reference) or on Dask."""

from typing import TYPE_CHECKING, Any

from ._base import AbstractExecutor as AbstractExecutor
from ._blocks import read_block as read_block
from ._progress import Progress as Progress
from ._serial import SerialExecutor as SerialExecutor
from ._spec import InputSource as InputSource, TileSpec as TileSpec
from ._task import compute_block as compute_block, run_tile as run_tile

# The Dask parts import distributed (about 0.3 s), which a job computed in
# this process never needs: they load on first use.
_LAZY = {
    "DaskExecutor": "._dask",
    "JaxDevicePlugin": "._workers",
    "JaxWorkerPlugin": "._workers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from ._dask import DaskExecutor as DaskExecutor
    from ._workers import (
        JaxDevicePlugin as JaxDevicePlugin,
        JaxWorkerPlugin as JaxWorkerPlugin,
    )
