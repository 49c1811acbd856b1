"""Failed tiles and lost workers, said once each; tracebacks to a log file.

:func:`ntkdist._run.run_tiles` hands each executor event to a
:class:`Reporter`: one terminal line per distinct error, every traceback in
``<store>.log`` beside the store, lost workers counted on the progress line.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import TextIO, final

from ._planner import Tile
from .executors import AbstractExecutor, Progress
from .storage import is_url


def log_path(store_path: str) -> str:
    """The job's log of full tracebacks: a sibling ``<store>.log``."""
    return os.path.abspath(store_path).rstrip(os.sep) + ".log"


def first_line(err: BaseException) -> str:
    """``Type: message`` in one line; of a message that holds a traceback (a
    callback's error re-raised by XLA), its last unindented line: the cause."""
    text = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    line = text[0] if text else ""
    if len(text) > 1 and "Traceback (most recent call last)" in text[0]:
        causes = [ln for ln in text[1:] if not ln[:1].isspace()]
        line = causes[-1] if causes else line
    return f"{type(err).__name__}: {line}".rstrip(": ")


@final
class Reporter:
    """Failed tiles and lost workers, said once each on the terminal.

    Each distinct error (its type and first line) gets one line; every failed
    tile's full traceback goes to the log file beside the store. Lost workers
    and tiles run again are counted on the progress line.
    """

    def __init__(
        self, path: str, bar: Progress, out: TextIO, runner: AbstractExecutor
    ) -> None:
        self.log = None if is_url(path) else log_path(path)
        self.logged = False
        self.bar, self.out = bar, out
        self.client = getattr(runner, "client", None)
        self.seen: set[str] = set()
        self.workers = self._workers()
        self._checked = time.monotonic()

    def _workers(self) -> set[str]:
        if self.client is None:
            return set()
        try:
            return set(self.client.nthreads())
        except Exception:
            return set()

    def tick(self) -> None:
        """Notice workers that left (at most once a second)."""
        if self.client is None or time.monotonic() - self._checked < 1.0:
            return
        self._count_lost()

    def _count_lost(self) -> None:
        self._checked = time.monotonic()
        now = self._workers()
        gone = len(self.workers - now)
        self.workers |= now
        if gone > self.bar.lost_workers:
            if self.bar.lost_workers == 0:
                self._say(
                    "[ntkdist] a worker was lost; its tiles are computed again "
                    "elsewhere"
                )
            self.bar.lost_workers = gone

    def __call__(self, kind: str, tile: Tile, err: BaseException | None) -> None:
        if kind == "lost":
            self.bar.retried += 1
            self._count_lost()
            return
        if err is None:
            return
        self.bar.failed += 1
        self._write_log(tile, err)
        what = first_line(err)
        if what in self.seen:
            return
        self.seen.add(what)
        where = f" (full traceback in {self.log})" if self.logged else ""
        self._say(f"[ntkdist] tile {tile.key} failed: {what}{where}")

    def _say(self, line: str) -> None:
        self.out.write(("\n" if self.bar._tty and self.bar.enabled else "") + line)
        self.out.write("\n")
        self.out.flush()

    def _write_log(self, tile: Tile, err: BaseException) -> None:
        if self.log is None:
            return
        import traceback

        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        try:
            with open(self.log, "a") as f:
                f.write(f"--- {stamp} tile {tile.key} (rows {tile.rows}, cols ")
                f.write(f"{tile.cols}) failed:\n")
                f.write("".join(traceback.format_exception(err)))
            self.logged = True
        except OSError:
            pass
