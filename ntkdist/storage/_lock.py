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

from .._errors import StoreLockedError

# Seconds between heartbeats of a live lock holder.
HEARTBEAT_SECONDS = 5.0
# A lock whose heartbeat is older than this is stale, even on another host.
STALE_SECONDS = 60.0


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
        stale_seconds: float = STALE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        """Prepare (not take) the lock of the store at ``store_path``."""
        self.path = lock_path(store_path)
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

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
        if rec is None:  # unreadable: a holder died while writing it
            with contextlib.suppress(OSError):
                return time.time() - os.path.getmtime(self.path) > self.stale_seconds
            return True
        if rec.get("host") == socket.gethostname() and not _pid_alive(int(rec["pid"])):
            return True
        return time.time() - float(rec.get("heartbeat", 0)) > self.stale_seconds

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
                if not self._stale(rec):
                    raise self._locked_error(rec) from None
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
            tmp = f"{self.path}.{self._token}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self._record(), f)
                os.replace(tmp, self.path)
            except OSError:
                return

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
