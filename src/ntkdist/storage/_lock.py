"""A store lock that a crashed job does not hold forever."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

from .._errors import LockLostError, StoreLockedError

# Seconds between heartbeats of a live lock holder.
HEARTBEAT_SECONDS = 5.0
# A lock whose heartbeat is older than this is stale, even on another host.
STALE_SECONDS = 60.0
# Environment variables that override the two (seconds), for every job that
# starts with them set; both jobs sharing a store should see the same values.
STALE_ENV = "NTKDIST_LOCK_STALE_SECONDS"
HEARTBEAT_ENV = "NTKDIST_LOCK_HEARTBEAT_SECONDS"


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env, default))
    except ValueError:
        return default
    return value if value > 0 else default


def lock_path(store_path: str) -> str:
    """The lock file of a local store: a sibling ``<store>.lock``.

    It lives beside the Zarr hierarchy, not inside it, so that readers
    listing the hierarchy see only Zarr objects.
    """
    return os.path.abspath(store_path).rstrip(os.sep) + ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive lock of one store by one job: a file with pid, host and heartbeat.

    The holder rewrites the heartbeat every ``HEARTBEAT_SECONDS``. Another job
    takes over a lock whose holder is a dead process on this host, or whose
    heartbeat is older than ``STALE_SECONDS``; otherwise it is refused with
    :class:`StoreLockedError`.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with StoreLock(os.path.join(d, "k.zarr")) as lock:
        ...     os.path.exists(lock.path)
        True
    """

    def __init__(
        self,
        store_path: str,
        *,
        stale_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
    ) -> None:
        """Prepare (not take) the lock of the store at ``store_path``.

        ``stale_seconds`` and ``heartbeat_seconds`` default to the environment
        variables ``NTKDIST_LOCK_STALE_SECONDS`` and
        ``NTKDIST_LOCK_HEARTBEAT_SECONDS``, else 60 s and 5 s.
        """
        self.path = lock_path(store_path)
        self.stale_seconds = (
            _seconds(STALE_ENV, STALE_SECONDS)
            if stale_seconds is None
            else stale_seconds
        )
        self.heartbeat_seconds = (
            _seconds(HEARTBEAT_ENV, min(HEARTBEAT_SECONDS, self.stale_seconds / 4))
            if heartbeat_seconds is None
            else heartbeat_seconds
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        # What acquire() took over, said in words (None: the lock was free).
        self.took_over: str | None = None
        # Set when the heartbeat finds the lock is no longer this job's.
        self._lost: str | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self._token,
            "heartbeat": time.time(),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return None

    def _stale(self, rec: dict[str, Any] | None) -> bool:
        return self.state(rec)[0] != "held"

    def state(self, rec: dict[str, Any] | None = None) -> tuple[str, str]:
        """``(state, words)`` of the lock file as it is now.

        ``state`` is ``"free"`` (no file), ``"held"`` (a live holder),
        ``"dead"`` (its holder's process on this host is gone) or ``"silent"``
        (no heartbeat for longer than ``stale_seconds``); ``words`` say who.
        """
        if rec is None:
            if not os.path.exists(self.path):
                return "free", "free"
            rec = self._read()
        if rec is None:  # unreadable: a holder died while writing it
            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                return "free", "free"
            if age > self.stale_seconds:
                return "silent", f"an unreadable lock file, silent for {age:.0f} s"
            return "held", "an unknown job (its lock file is being written)"
        age = time.time() - float(rec.get("heartbeat", 0))
        who = f"pid {rec.get('pid')} on host {rec.get('host')}"
        here = rec.get("host") == socket.gethostname()
        if here and not _pid_alive(int(rec.get("pid", 0))):
            return "dead", f"{who}, dead (last heartbeat {age:.0f} s ago)"
        if age > self.stale_seconds:
            return "silent", f"{who}, silent for {age:.0f} s"
        return "held", f"{who}, last heartbeat {age:.0f} s ago"

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; start the heartbeat.

        Raises:
            StoreLockedError: a live job holds it.
        """
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self._read()
                state, words = self.state(rec)
                if state == "free":
                    continue
                if state == "held":
                    raise self._locked_error(rec) from None
                self.took_over = f"taking over the lock of {words}"
                # Move the stale lock aside atomically: of two jobs taking
                # over at once, only one rename succeeds.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, f"{self.path}.stale-{self._token}")
                    os.remove(f"{self.path}.stale-{self._token}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self._thread = threading.Thread(
                target=self._beat, daemon=True, name="ntkdist-lock-heartbeat"
            )
            self._thread.start()
            return
        raise self._locked_error(self._read())

    def _locked_error(self, rec: dict[str, Any] | None) -> StoreLockedError:
        who = (
            "an unknown job"
            if rec is None
            else (
                f"pid {rec.get('pid')} on host {rec.get('host')}, last heartbeat "
                f"{time.time() - float(rec.get('heartbeat', 0)):.0f} s ago"
            )
        )
        return StoreLockedError(
            f"the store is being written by another job ({who}); lock file "
            f"{self.path}. Wait for that job to finish. If it is dead on another "
            f"host, the lock expires {self.stale_seconds:.0f} s after its last "
            "heartbeat, or delete the lock file."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            # Never overwrite a lock another job has taken over meanwhile
            # (this process was paused past stale_seconds).
            if not self._still_mine():
                return
            tmp = f"{self.path}.{self._token}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self._record(), f)
                os.replace(tmp, self.path)
            except OSError:
                return

    def _still_mine(self) -> bool:
        if self._lost is not None:
            return False
        rec = self._read()
        if rec is not None and rec.get("token") == self._token:
            return True
        if rec is None and os.path.exists(self.path):
            return True  # being rewritten by another job's takeover: check again
        if rec is None:
            self._lost = "its lock file is gone (another job took over and finished)"
        else:
            self._lost = (
                f"it now belongs to pid {rec.get('pid')} on host {rec.get('host')}"
            )
        return False

    def check(self) -> None:
        """Raise if the lock is no longer this job's (taken over as stale).

        Called before each marker the job writes.

        Raises:
            LockLostError: another job took the lock over.
        """
        if self._still_mine():
            return
        raise LockLostError(
            f"this job lost the store's lock ({self.path}): {self._lost}. It was "
            f"paused or silent for more than {self.stale_seconds:.0f} s, so "
            "another job took the store over; this job stops without writing "
            "more. Finished tiles are recorded; check the store with "
            "'ntkdist status'."
        )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if this job holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        rec = self._read()
        if rec is not None and rec.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> StoreLock:
        """Acquire."""
        self.acquire()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release."""
        self.release()
