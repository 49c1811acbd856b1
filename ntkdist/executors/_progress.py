"""A progress bar fed by the markers: tiles done, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Seconds between lines when the stream is not a terminal.
LINE_EVERY = 5.0
# Seconds between redraws on a terminal.
REDRAW_EVERY = 0.2


class Progress:
    """Tiles done out of the plan's total, with this run's rate and an ETA.

    The count starts from the markers already in the store, so a resumed run
    shows true progress; the rate counts only tiles finished in this run.

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
    ) -> None:
        """Start counting from ``done`` of ``total`` tiles."""
        self.done0 = done
        self.done = done
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lost_workers = 0
        self.retried = 0
        self.failed = 0

    def line(self) -> str:
        """The current status line."""
        elapsed = time.monotonic() - self.start
        new = self.done - self.done0
        rate = new / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = "--" if rate == 0 else _hms(left / rate)
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
            f"{rate:.2f} tiles/s | elapsed {_hms(elapsed)} | ETA {eta}{extra}"
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
