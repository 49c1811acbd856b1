"""SerialExecutor: tiles one after another in this process (the reference path)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, final

import numpy as np

from .._model import Model
from .._planner import Tile
from ..storage._space import WriteFault
from ._base import AbstractExecutor, OnDone
from ._spec import TileSpec
from ._task import compute_tile, write_block


@final
class SerialExecutor(AbstractExecutor):
    """Run each tile in order in the calling process; good for debugging.

    Uses the same task function as the Dask executor, so a bug shows the
    same way here, in a plain traceback.

    Args:
        raise_errors: re-raise a tile's error at once instead of collecting it.
    """

    def __init__(self, *, raise_errors: bool = False) -> None:
        """Configure."""
        self.raise_errors = raise_errors

    @property
    def n_workers(self) -> int:
        """One."""
        return 1

    def run(
        self,
        spec: TileSpec,
        model: Model,
        params: Any,
        todo: Sequence[Tile],
        on_done: OnDone,
    ) -> list[tuple[Tile, BaseException]]:
        """Compute ``todo`` in order; record each tile as it finishes.

        A second thread writes each tile while the next one computes, as on
        a Dask worker; tiles are recorded in order, once written.
        """
        failures: list[tuple[Tile, BaseException]] = []

        def settle(tile: Tile, result: Any) -> bool:
            """Record one outcome; False once writing can no longer succeed."""
            if isinstance(result, WriteFault):  # every later tile would fail too
                failures.append((tile, result.error()))
                return False
            if isinstance(result, BaseException):
                if self.raise_errors:
                    raise result
                failures.append((tile, result))
                self._event("failed", tile, result)
                return True
            on_done(tile, result)
            return True

        with ThreadPoolExecutor(1, thread_name_prefix="ntkdist-write") as writer:
            pending: tuple[Tile, Future[Any]] | None = None
            for tile in todo:
                try:
                    block: Any = compute_tile(tile, spec, (model, params))
                except Exception as err:
                    block = err
                if pending is not None:
                    written, pending = pending, None
                    if not settle(written[0], _outcome(written[1])):
                        break
                if not isinstance(block, np.ndarray):  # an error or a write fault
                    if not settle(tile, block):
                        break
                    continue
                pending = (tile, writer.submit(write_block, tile, spec, block))
            if pending is not None:
                settle(pending[0], _outcome(pending[1]))
        return failures


def _outcome(future: Future[Any]) -> Any:
    """A write's checksums, fault or exception."""
    try:
        return future.result()
    except Exception as err:
        return err
