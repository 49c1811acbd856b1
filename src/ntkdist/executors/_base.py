"""The executor interface: run tile tasks, report each finished tile."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

from .._model import Model
from .._planner import Tile
from ._spec import TileSpec

OnDone = Callable[[Tile, tuple[int, int]], None]
# on_event(kind, tile, error): "failed" (a tile failed for good), "lost" (its
# worker was lost; the tile runs again elsewhere).
OnEvent = Callable[[str, Tile, BaseException | None], None]


class AbstractExecutor(abc.ABC):
    """Runs tile tasks; the coordinator records each finished tile's marker.

    ``run`` calls ``on_done(tile, checksums)`` in the coordinator as each tile
    finishes, and returns the tiles that failed (after retries) with their
    errors; it never raises for a failed tile, so finished tiles stay recorded.
    """

    @property
    @abc.abstractmethod
    def n_workers(self) -> int:
        """Workers that run tiles at once (for planning)."""

    @abc.abstractmethod
    def run(
        self,
        spec: TileSpec,
        model: Model,
        params: Any,
        todo: Sequence[Tile],
        on_done: OnDone,
    ) -> list[tuple[Tile, BaseException]]:
        """Compute ``todo``; call ``on_done`` per finished tile; return failures."""

    # Set by the coordinator before ``run``: told of failed tiles and lost workers.
    on_event: OnEvent | None = None

    def _event(self, kind: str, tile: Tile, err: BaseException | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, tile, err)

    def __enter__(self) -> AbstractExecutor:
        """Start any resources (a cluster)."""
        return self

    def __exit__(self, *exc: object) -> None:  # noqa: B027
        """Release them (nothing by default)."""
