"""Write faults that no retry fixes: a read-only, full or forbidden store.

A tile whose write fails with one of :data:`FATAL_ERRNOS` would fail the
same way on every retry and on every other tile, so the job stops at the
first one and says, in one line, what is read-only or full and how much
space it still needs. :func:`check_writable` finds the same faults before
any tile is computed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import uuid

import numpy as np

from .._errors import StoreWriteError
from .._planner import Tile
from .._units import format_bytes

# Write errors that retrying cannot fix.
FATAL_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}
)


def is_fatal(err: BaseException) -> bool:
    """Whether ``err`` is a write error that no retry fixes."""
    return isinstance(err, OSError) and err.errno in FATAL_ERRNOS


@dataclasses.dataclass(frozen=True)
class WriteFault:
    """A tile's fatal write error, returned (not raised) so it is not retried."""

    errno: int
    strerror: str
    filename: str | None

    @classmethod
    def of(cls, err: OSError) -> WriteFault:
        """The fault of an ``OSError`` whose errno is in :data:`FATAL_ERRNOS`."""
        name = err.filename if isinstance(err.filename, str) else None
        return cls(int(err.errno or 0), err.strerror or str(err), name)

    def error(self) -> OSError:
        """The ``OSError`` it stands for."""
        return OSError(self.errno, self.strerror, self.filename)


def mount_point(path: str) -> str:
    """The mount point of the file system holding ``path``.

    Read from ``/proc/self/mounts`` where there is one (it also knows bind
    mounts, which ``os.path.ismount`` does not), else found by walking up.
    """
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            points = [_unescape(line.split()[1]) for line in f if line.strip()]
    except (OSError, IndexError):
        points = []
    inside = [p for p in points if path == p or path.startswith(p.rstrip("/") + "/")]
    if inside:
        return max(inside, key=len)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _unescape(field: str) -> str:
    """A ``/proc/mounts`` field with its octal escapes (``\\040``) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def free_bytes(path: str) -> int:
    """Bytes this user may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def bytes_needed(
    kernel_chunks: tuple[int, ...], itemsize: int, todo: list[Tile]
) -> int:
    """Bytes the chunks of ``todo`` (and their mirrors) take, uncompressed."""
    chunk = int(np.prod(kernel_chunks)) * itemsize
    return chunk * sum(2 if t.kind == "mirror" else 1 for t in todo)


def fault_message(
    err: OSError, directory: str, needed: int, tiles: int, *, before: bool = False
) -> str:
    """One line: what cannot be written, why, and what the job still needs."""
    where = err.filename if isinstance(err.filename, str) else directory
    mount = mount_point(directory)
    need = f"the job still needs {format_bytes(needed)} for {tiles} tiles"
    code = errno.errorcode.get(err.errno or 0, str(err.errno))
    if err.errno == errno.EROFS:
        what = f"the file system at {mount} is read-only ({code}; writing {where})"
        todo = "remount it read-write or choose a store on a writable one"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "full" if err.errno == errno.ENOSPC else "over this user's quota"
        if before and err.errno == errno.ENOSPC:
            full = "too small for it"
        try:
            free = format_bytes(free_bytes(directory))
        except OSError:
            free = "?"
        what = f"the file system at {mount} is {full} ({code}, {free} free)"
        todo = "free space there or move the store to a larger file system"
    else:
        what = f"no permission to write {where} ({code}: {err.strerror})"
        todo = "make the store writable for this user or choose another path"
    return (
        f"cannot write the kernel store: {what}; {need}. Nothing was lost: "
        f"{todo}, then run the same job again to compute only the missing tiles."
    )


def check_writable(
    directory: str, kernel_chunks: tuple[int, ...], itemsize: int, todo: list[Tile]
) -> None:
    """Refuse, before any tile, a kernel directory that cannot take ``todo``.

    Writes and removes a small file in ``directory`` (read-only or forbidden
    file systems fail here), then compares the free space with what the
    tiles' chunks take.

    Raises:
        StoreWriteError: the directory cannot be written, or has too little room.
    """
    needed = bytes_needed(kernel_chunks, itemsize, todo)
    probe = os.path.join(directory, f".ntkdist-write-check-{uuid.uuid4().hex}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        if is_fatal(err):
            named = OSError(err.errno, err.strerror, directory)
            raise StoreWriteError(
                fault_message(named, directory, needed, len(todo))
            ) from err
        raise
    try:
        free = free_bytes(directory)
    except OSError:
        return
    if free < needed:
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
        raise StoreWriteError(
            fault_message(err, directory, needed, len(todo), before=True)
        )
