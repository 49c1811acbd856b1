"""A progress bar fed by the markers: tiles done, rate and ETA.

The rate, and so the ETA, leaves out each worker's first tile: that one pays
for compiling the tile functions (seconds to minutes), which later tiles do
not. Until a rate exists the ETA reads ``compiling…``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO, final

# Seconds between lines when the stream is not a terminal.
LINE_EVERY = 5.0
# Seconds between redraws on a terminal.
REDRAW_EVERY = 0.2


@final
class Rate:
    """Tiles per second after warm-up: from the ``warmup``-th finished tile on.

    The first ``warmup`` tiles (one per worker) include compilation; the rate
    is the tiles finished after them over the time since the last of them.

    Example:
        >>> r = Rate(warmup=1)
        >>> r.add(60.0); r.per_second() is None    # the first tile compiled
        True
        >>> r.add(61.0); r.add(62.0); r.per_second()
        1.0
    """

    def __init__(self, warmup: int = 1) -> None:
        """Leave out the first ``warmup`` tiles."""
        self.warmup = max(1, warmup)
        self.times: list[float] = []

    def add(self, t: float, n: int = 1) -> None:
        """``n`` tiles finished at time ``t`` (seconds, any origin)."""
        self.times.extend([t] * n)

    def per_second(self) -> float | None:
        """The steady rate, or ``None`` until a tile after the warm-up finished."""
        k = len(self.times)
        if k <= self.warmup:
            return None
        dt = self.times[-1] - self.times[self.warmup - 1]
        return (k - self.warmup) / dt if dt > 0 else None

    def eta(self, left: int) -> float | None:
        """Predicted seconds for ``left`` more tiles (``None``: no rate yet)."""
        rate = self.per_second()
        return None if rate is None else left / rate


class Progress:
    """Tiles done out of the plan's total, with this run's rate and an ETA.

    The count starts from the markers already in the store, so a resumed run
    shows true progress; the rate counts only tiles finished in this run,
    after each of the ``workers``' first (see :class:`Rate`).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = Progress(done=2, total=4, stream=out)
        >>> p.advance(2); p.close()
        >>> "4/4" in out.getvalue()
        True
    """

    def __init__(
        self,
        *,
        done: int,
        total: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        workers: int = 1,
    ) -> None:
        """Start counting from ``done`` of ``total`` tiles."""
        self.done0 = done
        self.done = done
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.start = time.monotonic()
        self.rate = Rate(warmup=workers)
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lost_workers = 0
        self.retried = 0
        self.failed = 0

    def line(self) -> str:
        """The current status line."""
        elapsed = time.monotonic() - self.start
        left = self.total - self.done
        steady = self.rate.per_second()
        if left == 0:
            new = self.done - self.done0
            rate, eta = f"{new / elapsed if elapsed > 0 else 0.0:.2f}", _hms(0)
        elif steady is None:
            rate, eta = "--", "compiling…"
        else:
            rate, eta = f"{steady:.2f}", _hms(left / steady)
        pct = 100.0 * self.done / max(1, self.total)
        extra = "".join(
            f" | {label} {n}"
            for label, n in (
                ("failed", self.failed),
                ("lost workers", self.lost_workers),
                ("retried tiles", self.retried),
            )
            if n
        )
        return (
            f"[ntkdist] tiles {self.done}/{self.total} ({pct:.0f}%) | "
            f"{rate} tiles/s | elapsed {_hms(elapsed)} | ETA {eta}{extra}"
        )

    def note(self, message: str) -> None:
        """Print one line of its own (ending a terminal's status line first)."""
        if not self.enabled:
            return
        self.stream.write(("\n" if self._tty else "") + message + "\n")
        self.stream.flush()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more finished tiles (markers written)."""
        self.done += n
        now = time.monotonic()
        self.rate.add(now, n)
        if not self.enabled or now - self._last < (
            REDRAW_EVERY if self._tty else LINE_EVERY
        ):
            return
        self._last = now
        self._draw()

    def _draw(self, end: str = "") -> None:
        if self._tty:
            self.stream.write("\r" + self.line() + end)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Print the final line."""
        if self.enabled:
            self._draw(end="\n")


def _hms(s: float) -> str:
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"
