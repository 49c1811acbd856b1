"""Transparent huge pages for worker processes' large buffers (Linux, glibc).

A ``full`` tile allocates several buffers of hundreds of MB (the result, its
working layout, the host copy). glibc serves each from a fresh ``mmap`` and
returns it on free, so every tile touches every page anew: measured on a
2-core x86-64 VM, a 1 s ``full`` tile (617² samples, O = 10, float64) took
305,000 page faults and 0.7 s of system time. With glibc's
``glibc.malloc.hugetlb=1`` tunable, malloc asks for transparent huge pages
(``madvise``) and the same tile took 1,500 faults and 0.57–0.85 s instead of
1.01–1.16 s. Tunables are read when a process starts, so this applies to the
worker processes ntkdist starts (and the deploy recipes' environments); other
C libraries ignore the variable.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
ON = f"{TUNABLE}=1"


def glibc_tunables(existing: str | None = None) -> str:
    """``GLIBC_TUNABLES`` with huge pages for malloc, keeping what ``existing`` sets.

    A ``glibc.malloc.hugetlb`` already in ``existing`` wins (set it to 0 to opt
    out).

    Example:
        >>> glibc_tunables("glibc.malloc.arena_max=2")
        'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
        >>> glibc_tunables("glibc.malloc.hugetlb=0")
        'glibc.malloc.hugetlb=0'
    """
    parts = [p for p in (existing or "").split(":") if p]
    return ":".join(parts if _sets_tunable(existing) else [*parts, ON])


def _sets_tunable(tunables: str | None) -> bool:
    """Whether a ``GLIBC_TUNABLES`` value names ``glibc.malloc.hugetlb``."""
    return any(p.split("=", 1)[0] == TUNABLE for p in (tunables or "").split(":"))


def huge_pages_env() -> dict[str, str]:
    """``{"GLIBC_TUNABLES": ...}`` for a child process, from this one's."""
    return {"GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES"))}


def configured() -> bool:
    """Whether this process was started with ``glibc.malloc.hugetlb`` set."""
    return _sets_tunable(os.environ.get("GLIBC_TUNABLES"))


def reexec_with_huge_pages() -> None:
    """Restart this program with huge pages for malloc, unless its start set them.

    For benchmark commands: their in-process reference loops must allocate
    as ntkdist's workers do, or the comparison would favour the workers.
    Returns only where nothing needs restarting (or off Linux).
    """
    if not sys.platform.startswith("linux") or configured():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, **huge_pages_env()}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
