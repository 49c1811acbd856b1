"""Ctrl-C and SIGTERM: a job stops quietly and says how to resume.

The command line turns SIGTERM (what SLURM and ``kill`` send) into the same
``KeyboardInterrupt`` as Ctrl-C, so both take one way out: the executor
cancels its tasks and closes its cluster, the store's lock is released, and
one line says how many tiles are on disk. The exit status is ``128 + signal``
(130 for SIGINT, 143 for SIGTERM), as shells report a process the signal
killed. A second signal during that shutdown is ignored (it takes a second
or two); SIGKILL still ends everything, and a rerun resumes all the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, final


@final
class Signals:
    """Which signal interrupted the run (``None``: none did)."""

    signum: int | None = None

    def exit_status(self) -> int:
        """``128 + signum``; 130 (SIGINT) for a plain ``KeyboardInterrupt``."""
        return 128 + (self.signum or signal.SIGINT)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[Signals]:
    """Raise ``KeyboardInterrupt`` on SIGINT or SIGTERM, once.

    The first signal raises; later ones are ignored while the job shuts down.
    The previous handlers come back on exit. Outside the main thread it only
    yields (signal handlers cannot be set there).
    """
    seen = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        seen.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield seen
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """No log records at all for a while (Dask's shutdown after an interrupt:
    workers leaving with scattered data are errors to its scheduler)."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def children_stderr(path: str) -> Iterator[None]:
    """Processes started inside the block write their stderr to ``path``.

    The embedded cluster's worker processes are started inside: a Ctrl-C while
    they still import JAX (before :func:`ignore_sigint` runs in them) makes
    each print a traceback, which belongs in a log, not on the terminal. This
    process's own stderr is back once the block ends; an empty log is removed.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # no stderr to save, or nowhere to write: leave it as it is
        yield
        return
    try:
        os.dup2(fd, 2)
        yield
    finally:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
            with contextlib.suppress(OSError):
                if os.path.getsize(path) == 0:
                    os.remove(path)


def ignore_sigint() -> None:
    """Ignore SIGINT in this process (an embedded cluster's worker).

    A terminal's Ctrl-C reaches every process of its group; the coordinator
    stops the workers itself, so theirs would only print tracebacks.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted_message(path: str | None) -> str:
    """What the command line says when a compute job was interrupted."""
    if path is None:
        return "interrupted."
    from .storage import KernelStore, store_state

    try:
        if store_state(path) == "ntkdist":
            done, total = KernelStore.open(path).progress()
            return (
                f"interrupted: {done} of {total} tiles are on disk in {path}; run "
                "the same command to resume."
            )
    except Exception:
        pass
    return "interrupted before any tile was written; run the same command to start."
