r"""One node with several GPUs: one ntkdist worker per GPU.

With dask-cuda installed, :func:`make_cluster` starts a ``LocalCUDACluster``,
which gives worker ``i`` ``CUDA_VISIBLE_DEVICES=i,i+1,...,0,...``; every
worker preloads ``ntkdist.cluster``, which tells JAX to use only the first
visible device, so each worker drives exactly its own GPU. Without dask-cuda
(``use_dask_cuda=False``) the same layout is built from plain distributed.

Run a kernel on every GPU of this node (with TLS; certificates from
``python deploy/tls.py DIR``)::

    python deploy/multi_gpu_node.py --tls-dir ~/.ntkdist/tls --demo

Or from a script::

    from multi_gpu_node import make_cluster
    with make_cluster(tls_dir="~/.ntkdist/tls") as cluster, \\
            Client(cluster, security=cluster.security) as client:
        executor = DaskExecutor(client, resources=gpu_resources())
        ntkdist.compute(apply_fn, params, x, store="k.zarr", executor=executor)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

import dask
from distributed import Nanny, Scheduler, SpecCluster

from ntkdist.cluster import (
    GPU_RESOURCE,
    rotated_visible_devices,
    security_from_directory,
    worker_env,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


def visible_gpus() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    import subprocess

    try:
        listing = subprocess.run(
            ["nvidia-smi", "--list-gpus"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return len(listing.strip().splitlines())


def make_cluster(
    *,
    tls_dir: str | None,
    n_gpus: int | None = None,
    x64: bool | None = None,
    compilation_cache_dir: str | None = None,
    host: str = "127.0.0.1",
    dashboard_address: str = ":0",
    use_dask_cuda: bool = True,
) -> Any:
    """A cluster on this node with one single-threaded worker per GPU.

    Args:
        tls_dir: directory from ``deploy/tls.py``; ``None`` for plain TCP.
        n_gpus: workers to start (default: every visible GPU).
        x64: ``JAX_ENABLE_X64`` for the workers; ``None`` leaves the default.
        compilation_cache_dir: node-local JAX compilation cache.
        host: address the scheduler and workers bind to.
        dashboard_address: the scheduler's dashboard.
        use_dask_cuda: use dask-cuda's ``LocalCUDACluster``; ``False`` builds
            the same layout (rotated ``CUDA_VISIBLE_DEVICES``, ``GPU=1``) with
            distributed alone.

    Returns:
        The cluster (a context manager). Workers carry the resource ``GPU=1``.

    Raises:
        RuntimeError: no GPU is visible and ``n_gpus`` was not given.
    """
    n = visible_gpus() if n_gpus is None else n_gpus
    if n < 1:
        raise RuntimeError(
            "no GPU is visible (CUDA_VISIBLE_DEVICES empty, nvidia-smi absent); "
            "pass n_gpus= or run on a GPU node."
        )
    env = worker_env(gpu=True, x64=x64, compilation_cache_dir=compilation_cache_dir)
    security = (
        None
        if tls_dir is None
        else security_from_directory(os.path.expanduser(tls_dir))
    )
    protocol = "tls://" if security is not None else "tcp://"
    common: dict[str, Any] = {
        "security": security,
        "protocol": protocol,
        "host": host,
        "dashboard_address": dashboard_address,
    }
    if use_dask_cuda:
        from dask_cuda import LocalCUDACluster

        # LocalCUDACluster replaces each worker's env= with its own
        # CUDA_VISIBLE_DEVICES, so the JAX variables go through the config
        # that every Nanny reads when it is created.
        environ = {**dask.config.get("distributed.nanny.environ"), **env}
        with dask.config.set({"distributed.nanny.environ": environ}):
            return LocalCUDACluster(
                n_workers=n,
                threads_per_worker=1,
                resources={GPU_RESOURCE: 1},
                preload=["ntkdist.cluster"],
                **common,
            )
    return _spec_cluster(n, env, **common)


def _spec_cluster(
    n: int,
    env: dict[str, str],
    *,
    security: Any,
    protocol: str,
    host: str,
    dashboard_address: str,
) -> SpecCluster:
    """The LocalCUDACluster layout with distributed alone."""
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": host,
            "protocol": protocol,
            "dashboard_address": dashboard_address,
            "security": security,
        },
    }
    workers = {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "host": host,
                "protocol": protocol,
                "nthreads": 1,
                "resources": {GPU_RESOURCE: 1},
                "preload": ["ntkdist.cluster"],
                "env": {**env, "CUDA_VISIBLE_DEVICES": rotated_visible_devices(i, n)},
                "security": security,
            },
        }
        for i in range(n)
    }
    return SpecCluster(
        workers=workers, scheduler=scheduler, security=security, name="ntkdist-gpus"
    )


def demo(client: Any) -> None:
    """Compute a small kernel on every GPU and print what each worker sees."""
    import jax.numpy as jnp
    import numpy as np

    import ntkdist
    from ntkdist.cluster import gpu_resources, local_devices
    from ntkdist.executors import DaskExecutor

    for worker, devices in client.run(local_devices).items():
        print(f"{worker}: {devices}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32)).astype(np.float32)
    params = {
        "w1": rng.normal(size=(32, 256)).astype(np.float32) / 32**0.5,
        "w2": rng.normal(size=(256, 10)).astype(np.float32) / 16,
    }

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = ntkdist.compute(
            apply_fn,
            params,
            x,
            store=os.path.join(tmp, "k.zarr"),
            output="trace",
            tile=128,
            executor=DaskExecutor(client, resources=gpu_resources()),
        )
        print("kernel", store.kernel.shape, "complete:", store.complete)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: start the cluster, run the demo or wait for Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls-dir", help="certificates from deploy/tls.py")
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--gpus", type=int, help="workers (default: all GPUs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-dask-cuda", action="store_true")
    parser.add_argument("--demo", action="store_true", help="compute a small kernel")
    args = parser.parse_args(argv)
    if args.tls_dir is None and not args.no_tls:
        parser.error("pass --tls-dir DIR (from deploy/tls.py), or --no-tls")
    from distributed import Client

    with (
        make_cluster(
            tls_dir=None if args.no_tls else args.tls_dir,
            n_gpus=args.gpus,
            host=args.host,
            use_dask_cuda=not args.no_dask_cuda,
        ) as cluster,
        Client(cluster, security=cluster.security) as client,
    ):
        print(f"scheduler {cluster.scheduler_address}", flush=True)
        if args.demo:
            demo(client)
            return 0
        try:
            import time

            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
