"""Worker set-up for Dask clusters: one JAX device per worker, TLS certificates.

The conventions (DESIGN §5) in one place, so launchers and the engine agree:

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

import os
from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

from ._errors import ClusterError as ClusterError, InputError
from ._hugepages import huge_pages_env
from ._tls import (
    ROLES as ROLES,
    security_from_directory as security_from_directory,
    tls_env as tls_env,
    write_tls_certificates as write_tls_certificates,
)

if TYPE_CHECKING:
    from distributed import Worker

GPU_RESOURCE = "GPU"
"""The worker resource name that tile tasks on GPU clusters request."""


def worker_env(
    gpu: bool = False,
    *,
    tpu: bool = False,
    x64: bool | None = None,
    compilation_cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """The environment a worker process needs before JAX starts.

    Args:
        gpu: one CUDA GPU per worker: ``JAX_PLATFORMS=cuda`` and
            ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (several processes may then
            share a node without each reserving 75% of a device up front).
        tpu: one worker per TPU host: ``JAX_PLATFORMS=tpu``.
        x64: set ``JAX_ENABLE_X64`` to this; ``None`` leaves JAX's default.
        compilation_cache_dir: a node-local directory for JAX's persistent
            compilation cache (``JAX_COMPILATION_CACHE_DIR``); ``None`` for none.

    Always sets ``GLIBC_TUNABLES`` so that malloc uses transparent huge pages
    (large tiles then avoid most page faults; see ``ntkdist._hugepages``).

    Returns:
        Environment variables as strings, ready for ``env=`` of a cluster.

    Raises:
        InputError: both ``gpu`` and ``tpu`` are set (a ``ValueError``).

    Example:
        >>> env = worker_env(gpu=True, x64=True)
        >>> env["JAX_PLATFORMS"], env["XLA_PYTHON_CLIENT_PREALLOCATE"]
        ('cuda', 'false')
        >>> worker_env()["JAX_PLATFORMS"]
        'cpu'
    """
    if gpu and tpu:
        raise InputError(
            "worker_env() got gpu=True and tpu=True; a worker drives one kind of "
            "accelerator, so pass one of them."
        )
    env = {"JAX_PLATFORMS": "cuda" if gpu else "tpu" if tpu else "cpu"}
    env.update(huge_pages_env())  # see ntkdist._hugepages
    if gpu:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if x64 is not None:
        env["JAX_ENABLE_X64"] = "1" if x64 else "0"
    if compilation_cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = os.fspath(compilation_cache_dir)
    return env


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


def pin_first_device() -> None:
    """Tell JAX to use only the first visible CUDA device of this process.

    Must run before JAX creates its CUDA backend. Skipped when
    ``JAX_PLATFORMS`` names platforms without CUDA (``cpu``, ``tpu``); it has
    no effect on a machine without a CUDA backend. The environment's
    ``CUDA_VISIBLE_DEVICES`` decides which physical GPU is first.
    """
    import jax

    platforms = {p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p}
    if not platforms or platforms & {"cuda", "gpu"}:
        jax.config.update("jax_cuda_visible_devices", "0")


def local_devices() -> list[str]:
    """This process's JAX devices as strings (run it with ``client.run``).

    Returns:
        One string per local device, e.g. ``['cuda:0']`` on a pinned worker.
    """
    import jax

    return [f"{d.platform}:{d.id}" for d in jax.local_devices()]


class JaxDevicePlugin(WorkerPlugin):
    """Configures JAX in each worker before its first task, and checks it.

    On set-up it sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` for CUDA if the
    environment left it unset, pins JAX to the first visible device, applies
    ``x64`` and the compilation cache, and then starts JAX's backend so that a
    misconfigured worker fails at start-up, not in the middle of a run.

    Args:
        gpu: expect exactly one CUDA device in each worker.
        x64: set ``jax_enable_x64``; ``None`` leaves it.
        compilation_cache_dir: node-local directory for the persistent cache.

    Example:
        >>> plugin = JaxDevicePlugin(gpu=False, x64=True)
        >>> plugin.name
        'ntkdist-jax-devices'
    """

    name = "ntkdist-jax-devices"

    def __init__(
        self,
        gpu: bool = False,
        *,
        x64: bool | None = None,
        compilation_cache_dir: str | None = None,
    ) -> None:
        """See the class docstring."""
        self.gpu = gpu
        self.x64 = x64
        self.compilation_cache_dir = compilation_cache_dir

    def setup(self, worker: Worker) -> None:
        """Configure JAX in this worker process and check its devices.

        Raises:
            ClusterError: a GPU worker sees other than one CUDA device (a
                ``RuntimeError``).
        """
        if self.gpu:
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            os.environ.setdefault("JAX_PLATFORMS", "cuda")
        pin_first_device()
        import jax

        if self.x64 is not None:
            jax.config.update("jax_enable_x64", self.x64)
        if self.compilation_cache_dir is not None:
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache_dir)
        devices = jax.local_devices()
        if self.gpu and (len(devices) != 1 or devices[0].platform != "gpu"):
            raise ClusterError(
                f"worker {worker.name} should see one CUDA device, but JAX sees "
                f"{devices}; start one worker per GPU with JAX_PLATFORMS=cuda."
            )


def dask_setup(worker: Worker) -> None:
    """Preload hook: ``dask worker --preload ntkdist.cluster`` pins the device.

    Args:
        worker: the starting worker (unused; the pinning is per process).
    """
    del worker
    pin_first_device()
