"""What this machine offers a job: memory per worker, disk, parallel devices."""

from __future__ import annotations

import os
import shutil

import jax

MEMORY_FRACTION = 0.8
"""Share of a worker's memory that tiles are sized within when no budget is
given (Dask's embedded workers pause at 80 % of their memory limit)."""


def worker_memory(workers: int) -> float | None:
    """Bytes a worker may use when no ``memory_budget`` is given.

    Where JAX runs on GPUs (one worker per GPU): 80 % of the first GPU's
    allocator limit. Elsewhere: 80 % of this machine's memory (or of its
    cgroup's limit, in a container) shared by ``workers``. ``None`` where it
    cannot be read. A cluster whose workers differ from this machine needs an
    explicit budget.
    """
    if jax.default_backend() == "gpu":
        try:
            stats = jax.local_devices()[0].memory_stats() or {}
        except Exception:  # a backend without memory statistics
            stats = {}
        limit = stats.get("bytes_limit")
        return MEMORY_FRACTION * float(limit) if limit else None
    try:
        total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            text = fh.read().strip()
        if text.isdigit():
            total = min(total, float(text))
    except OSError:
        pass
    return MEMORY_FRACTION * total / max(1, workers)


def disk_space(where: str | None) -> float | None:
    """Half the free bytes of the disk holding ``where`` (default: the working
    directory), the most a factor store chosen by ``cache="auto"`` may take."""
    path = os.path.abspath(where or os.getcwd())
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return 0.5 * shutil.disk_usage(path).free
    except OSError:
        return None


def parallel_over(workers: int) -> int:
    """Devices a rate measured here scales over: one per worker on accelerators;
    on CPU the probe already used every core the workers would share."""
    return workers if jax.default_backend() != "cpu" else 1
