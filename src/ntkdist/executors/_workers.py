"""The one worker set-up: environment, device pinning, and the JAX plugin.

Every Dask worker that runs tile tasks is prepared here, whether the engine
started it (the embedded cluster of :class:`~ntkdist.executors.DaskExecutor`)
or a launcher did (``deploy/``, through :mod:`ntkdist.cluster`, which
re-exports these names):

- :func:`worker_env`: what the process needs before JAX starts (platform,
  no GPU memory preallocation, x64, huge pages, compilation cache).
- :func:`pin_first_device`: JAX uses only the first visible CUDA device, so
  one worker per GPU stays on its own device whatever ``CUDA_VISIBLE_DEVICES``
  lists (dask-cuda rotates it).
- :class:`JaxDevicePlugin`: runs that pinning and JAX's configuration in each
  worker before its first task, and checks the devices.
- ``GPU_RESOURCE``: the worker resource a GPU tile task requests.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, final

from distributed.diagnostics.plugin import WorkerPlugin

from .._errors import ClusterError, InputError
from .._hugepages import huge_pages_env
from ._devices import local_gpus as local_gpus

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


def jax_worker_env(x64: bool) -> dict[str, str]:
    """Environment for the embedded cluster's worker processes, set before JAX
    starts in them: as :func:`worker_env`, on the platforms JAX uses here."""
    env = {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "JAX_ENABLE_X64": "1" if x64 else "0",
        **huge_pages_env(),
    }
    if "JAX_PLATFORMS" in os.environ:
        env["JAX_PLATFORMS"] = os.environ["JAX_PLATFORMS"]
    return env


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


@final
class JaxDevicePlugin(WorkerPlugin):
    """Configures JAX in each worker before its first task, and checks it.

    The one worker set-up: the Dask executor registers it for every job
    (with the job's ``x64``), and launchers register it with ``gpu=True``.
    On set-up it sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` if the
    environment left it unset (no effect once JAX has started: set it in the
    worker environment too, as :func:`worker_env` does), pins JAX to the
    first visible device (:func:`pin_first_device`), applies ``x64`` and the
    compilation cache, and then starts JAX's backend so that a misconfigured
    worker fails at start-up, not in the middle of a run.

    Args:
        gpu: expect exactly one CUDA device in each worker.
        x64: set ``jax_enable_x64``; ``None`` leaves it.
        compilation_cache_dir: node-local directory for the persistent cache.
        name: the plugin's name on the cluster (a second plugin of the same
            name replaces the first).

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
        name: str = "ntkdist-jax-devices",
    ) -> None:
        """See the class docstring."""
        self.name = name
        self.gpu = gpu
        self.x64 = x64
        self.compilation_cache_dir = compilation_cache_dir

    def setup(self, worker: Worker) -> None:
        """Configure JAX in this worker process and check its devices.

        Raises:
            ClusterError: a GPU worker sees other than one CUDA device (a
                ``RuntimeError``).
        """
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if self.gpu:
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


def JaxWorkerPlugin(x64: bool) -> JaxDevicePlugin:
    """The plugin the Dask executor registers for a job: :class:`JaxDevicePlugin`
    with the job's ``x64``, named ``"ntkdist-jax"``.

    Example:
        >>> JaxWorkerPlugin(x64=True).name
        'ntkdist-jax'
    """
    return JaxDevicePlugin(x64=x64, name="ntkdist-jax")
