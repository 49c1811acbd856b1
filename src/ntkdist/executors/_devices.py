"""This machine's devices and the worker count they call for (no Dask here:
``distributed`` loads only when a cluster is started)."""

from __future__ import annotations

import os


def local_gpus() -> list[str]:
    """The CUDA devices this process's JAX sees, as ``CUDA_VISIBLE_DEVICES`` values.

    Empty unless JAX's default backend here is a GPU. JAX numbers the devices
    it sees from 0; with ``CUDA_VISIBLE_DEVICES`` set those are positions in
    it, so the values returned are what a child process must be given to see
    the same physical device.
    """
    import jax

    if jax.default_backend() != "gpu":
        return []
    ids = [d.id for d in jax.local_devices()]
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if visible:
        return [visible[i] for i in ids if i < len(visible)]
    return [str(i) for i in ids]


def default_workers() -> int:
    """Worker processes an embedded cluster starts: one per GPU, else per core."""
    return len(local_gpus()) or os.cpu_count() or 1
