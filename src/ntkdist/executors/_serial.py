"""SerialExecutor: tiles one after another in this process (the reference path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, final

from .._model import Model
from .._planner import Tile
from ..storage._space import WriteFault
from ._base import AbstractExecutor, OnDone
from ._spec import TileSpec
from ._task import run_tile


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
        """Compute ``todo`` in order; record each tile as it finishes."""
        failures: list[tuple[Tile, BaseException]] = []
        for tile in todo:
            try:
                checksums = run_tile(tile, spec, (model, params))
            except Exception as err:
                if self.raise_errors:
                    raise
                failures.append((tile, err))
                self._event("failed", tile, err)
                continue
            if isinstance(checksums, WriteFault):  # every later tile would fail too
                failures.append((tile, checksums.error()))
                break
            on_done(tile, checksums)
        return failures
