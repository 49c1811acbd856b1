"""Run ntkdist on a SLURM cluster: one SLURM job per GPU, with TLS.

Built on dask-jobqueue's ``SLURMCluster``. The scheduler runs in the process
that calls :func:`make_cluster` (a login node or a small CPU job); each worker
is a SLURM job asking for one GPU (``--gres=gpu:1``), advertising the worker
resource ``GPU=1``, and starting JAX with ``JAX_PLATFORMS=cuda`` and
``XLA_PYTHON_CLIENT_PREALLOCATE=false``. Scheduler, workers and clients talk
TLS with certificates from ``python deploy/tls.py DIR`` (``DIR`` must be on a
file system the compute nodes see).

Print the job script without submitting anything::

    python deploy/slurm.py --tls-dir ~/.ntkdist/tls --partition gpu --dry-run

Use it from a driver script (see deploy/README.md)::

    from slurm import make_cluster
    with make_cluster(tls_dir="~/.ntkdist/tls", partition="gpu") as cluster:
        cluster.scale(jobs=8)
        with Client(cluster, security=cluster.security) as client:
            ntkdist.compute(apply_fn, params, x, store="k.zarr", client=client)

Or keep a cluster up for other processes (``Ctrl-C`` stops it)::

    python deploy/slurm.py --tls-dir ~/.ntkdist/tls --jobs 8 \
        --scheduler-file ~/ntk-scheduler.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ntkdist.cluster import security_from_directory, worker_args, worker_env

if TYPE_CHECKING:
    from collections.abc import Sequence


def job_prologue(env: dict[str, str], setup: Sequence[str] = ()) -> list[str]:
    """Shell lines run before each worker starts: ``setup``, then the exports.

    Values are double-quoted, so ``$TMPDIR``-style references expand on the
    compute node (node-local paths for the compilation cache).

    Args:
        env: environment variables for the worker process.
        setup: lines run first (``module load cuda``, ``source venv/bin/activate``).

    Returns:
        The lines, in order.
    """
    return [*setup, *(f'export {key}="{value}"' for key, value in env.items())]


def make_cluster(
    *,
    tls_dir: str | None,
    partition: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "64GB",
    walltime: str = "04:00:00",
    x64: bool | None = None,
    compilation_cache_dir: str | None = "${TMPDIR:-/tmp}/ntkdist-jax-cache",
    setup: Sequence[str] = (),
    python: str | None = None,
    interface: str | None = None,
    host: str | None = None,
    dashboard_address: str = ":8787",
    scheduler_file: str | None = None,
    extra_directives: Sequence[str] = (),
) -> Any:
    """A ``SLURMCluster`` whose jobs each run one single-GPU ntkdist worker.

    Args:
        tls_dir: directory from ``deploy/tls.py`` (shared with the compute
            nodes); ``None`` runs without TLS, for trusted networks only.
        partition: SLURM partition (``-p``).
        account: SLURM account (``-A``).
        cores: CPU cores booked per job (``--cpus-per-task``); the worker
            itself runs one task thread, so one tile at a time uses the GPU.
        memory: host memory per job.
        walltime: per job, ``HH:MM:SS``.
        x64: ``JAX_ENABLE_X64`` for the workers; ``None`` leaves JAX's default
            (the engine still enables it for float64 jobs).
        compilation_cache_dir: node-local JAX compilation cache, expanded on
            the node; ``None`` for none.
        setup: shell lines before the worker starts (modules, venv).
        python: the Python on the compute nodes (default: this one).
        interface: network interface for scheduler and workers (e.g. ``ib0``).
        host: address the scheduler binds to (overrides ``interface`` for it).
        dashboard_address: the scheduler's dashboard (``":0"``: any free port).
        scheduler_file: write the scheduler's address here for other clients.
        extra_directives: more ``#SBATCH`` lines, e.g. ``--constraint=a100``.

    Returns:
        The cluster (a context manager); it submits nothing until ``scale``.
    """
    from dask_jobqueue import SLURMCluster

    env = worker_env(gpu=True, x64=x64, compilation_cache_dir=compilation_cache_dir)
    scheduler_options: dict[str, Any] = {"dashboard_address": dashboard_address}
    if host is not None:
        scheduler_options["host"] = host
    if scheduler_file is not None:
        scheduler_options["scheduler_file"] = os.path.expanduser(scheduler_file)
    kwargs: dict[str, Any] = {}
    if python is not None:
        kwargs["python"] = python
    if tls_dir is not None:
        kwargs["security"] = security_from_directory(os.path.expanduser(tls_dir))
    return SLURMCluster(
        queue=partition,
        account=account,
        # One worker thread: tiles run one at a time on the job's GPU even
        # when a client does not request the GPU resource; the job still books
        # ``cores`` CPUs for XLA's host threads and input loading.
        cores=1,
        job_cpu=cores,
        processes=1,
        memory=memory,
        walltime=walltime,
        job_name="ntkdist-worker",
        job_extra_directives=["--gres=gpu:1", *extra_directives],
        job_script_prologue=job_prologue(env, setup),
        worker_extra_args=worker_args(gpu=True),
        interface=interface,
        scheduler_options=scheduler_options,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the job script, or run a cluster until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls-dir", help="certificates from deploy/tls.py")
    parser.add_argument("--no-tls", action="store_true", help="trusted networks only")
    parser.add_argument("--jobs", type=int, default=1, help="GPU workers to start")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--memory", default="64GB")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--x64", action="store_true", help="JAX_ENABLE_X64=1")
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        help="shell line before the worker (repeatable)",
    )
    parser.add_argument("--python", help="python on the compute nodes")
    parser.add_argument("--interface", help="network interface, e.g. ib0")
    parser.add_argument("--host", help="scheduler bind address")
    parser.add_argument("--dashboard-address", default=":8787")
    parser.add_argument("--scheduler-file", help="write the address here")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job script and exit"
    )
    args = parser.parse_args(argv)
    if args.tls_dir is None and not args.no_tls:
        parser.error("pass --tls-dir DIR (from deploy/tls.py), or --no-tls")
    with make_cluster(
        tls_dir=None if args.no_tls else args.tls_dir,
        partition=args.partition,
        account=args.account,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        x64=True if args.x64 else None,
        setup=args.setup,
        python=args.python,
        interface=args.interface,
        host=args.host,
        dashboard_address=args.dashboard_address,
        scheduler_file=args.scheduler_file,
    ) as cluster:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(
            f"scheduler {cluster.scheduler_address}; dashboard "
            f"{cluster.dashboard_link}; Ctrl-C to stop",
            flush=True,
        )
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
