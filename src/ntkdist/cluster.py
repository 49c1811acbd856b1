"""Worker set-up for Dask clusters: one JAX device per worker, TLS certificates.

The conventions in one place, so launchers and the engine agree (the set-up
itself is :mod:`ntkdist.executors._workers`, shared with the engine's own
embedded cluster):

- **CPU** is the default: one worker process, JAX on the CPU.
- **CUDA**: one worker process per GPU, exactly one device visible to JAX, no
  memory preallocation, and a ``GPU=1`` worker resource so that tile tasks
  submitted with ``resources=gpu_resources()`` never share a device.
  dask-cuda's ``LocalCUDACluster`` rotates ``CUDA_VISIBLE_DEVICES`` (worker
  ``i`` sees ``i, i+1, ..., 0, ...``), so JAX must also be told to use only the
  first visible device; :func:`pin_first_device` does that, and
  :class:`JaxDevicePlugin` (or ``--preload ntkdist.cluster``) runs it in every
  worker before the first task.
- **TPU**: one worker per host, using all of that host's local devices.
- A persistent compilation cache on node-local disk is optional
  (``compilation_cache_dir``); workers that compile the same tile shape then
  load it instead of compiling again.

The environment from :func:`worker_env` must reach the worker process before
JAX starts: pass it as ``env=`` to ``LocalCluster``/``LocalCUDACluster`` (each
Nanny applies it to its worker), as ``job_script_prologue`` exports in
dask-jobqueue, or as container ``env`` in Kubernetes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import ClusterError as ClusterError, InputError
from ._tls import (
    ROLES as ROLES,
    security_from_directory as security_from_directory,
    tls_env as tls_env,
    write_tls_certificates as write_tls_certificates,
)
from .executors._workers import (
    GPU_RESOURCE as GPU_RESOURCE,
    JaxDevicePlugin as JaxDevicePlugin,
    pin_first_device as pin_first_device,
    worker_env as worker_env,
)

if TYPE_CHECKING:
    from distributed import Worker


def gpu_resources() -> dict[str, float]:
    """The resources one tile task requests on a GPU cluster.

    Workers started with ``--resources GPU=1`` (:func:`worker_args`) run at
    most one such task at a time. Resources do not isolate devices; that is
    the job of one visible device per worker.

    Returns:
        ``{"GPU": 1}``.

    Example:
        >>> gpu_resources()
        {'GPU': 1}
    """
    return {GPU_RESOURCE: 1}


def worker_args(gpu: bool = False) -> list[str]:
    """Command-line arguments for ``dask worker`` on a node of this kind.

    Args:
        gpu: add the ``GPU=1`` resource.

    Returns:
        Arguments to append to ``dask worker <scheduler>``. They always preload
        this module, whose ``dask_setup`` pins JAX to the first visible GPU.

    Example:
        >>> worker_args(gpu=True)
        ['--preload', 'ntkdist.cluster', '--resources', 'GPU=1']
    """
    args = ["--preload", "ntkdist.cluster"]
    if gpu:
        args += ["--resources", f"{GPU_RESOURCE}=1"]
    return args


def rotated_visible_devices(index: int, count: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for worker ``index`` of ``count``, as dask-cuda.

    Args:
        index: the worker's position, ``0 <= index < count``.
        count: GPUs on the node.

    Returns:
        The device list starting at ``index`` and wrapping around.

    Raises:
        InputError: ``index`` is outside ``range(count)`` (a ``ValueError``).

    Example:
        >>> rotated_visible_devices(1, 4)
        '1,2,3,0'
    """
    if not 0 <= index < count:
        raise InputError(f"worker index {index} is outside range({count}) GPUs.")
    return ",".join(str((index + k) % count) for k in range(count))


def local_devices() -> list[str]:
    """This process's JAX devices as strings (run it with ``client.run``).

    Returns:
        One string per local device, e.g. ``['cuda:0']`` on a pinned worker.
    """
    import jax

    return [f"{d.platform}:{d.id}" for d in jax.local_devices()]


def dask_setup(worker: Worker) -> None:
    """Preload hook: ``dask worker --preload ntkdist.cluster`` pins the device.

    Args:
        worker: the starting worker (unused; the pinning is per process).
    """
    del worker
    pin_first_device()
