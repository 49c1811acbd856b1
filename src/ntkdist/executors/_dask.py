"""DaskExecutor: tile tasks on a Dask cluster (worker set-up: ``_workers``)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from itertools import islice
from typing import Any, TextIO, final

from distributed import (
    Client,
    LocalCluster,
    Nanny,
    Scheduler,
    SpecCluster,
    as_completed,
)
from distributed.client import FutureCancelledError
from distributed.comm.core import CommClosedError
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from .._interrupt import children_stderr, ignore_sigint, quiet_logs
from .._model import Model
from .._planner import Tile
from ..storage._space import WriteFault
from ._base import AbstractExecutor, OnDone
from ._devices import default_workers as default_workers, local_gpus
from ._spec import TileSpec
from ._task import ByValue, run_tile
from ._workers import GPU_RESOURCE, JaxWorkerPlugin, jax_worker_env

# Futures in flight per worker thread: enough to keep workers busy, few
# enough that an interrupted job loses little.
WINDOW_PER_THREAD = 2
# Threads of each embedded worker process: one computes a tile while the other
# writes the previous one (``run_tile`` lets one tile compute at a time).
THREADS_PER_WORKER = 2
# Times a failed tile task is retried before the job reports it.
RETRIES = 3
# Times a tile is submitted again after its worker was lost mid-tile.
LOST_RESUBMITS = 3
# Seconds an interrupted job waits for its embedded cluster to close.
CLOSE_TIMEOUT = 10


@final
class IgnoreSigint(WorkerPlugin):
    """Embedded workers ignore SIGINT: a terminal's Ctrl-C reaches the whole
    process group, and the coordinator closes the workers itself."""

    name = "ntkdist-ignore-sigint"

    def setup(self, worker: Any) -> None:
        """Ignore SIGINT in this worker process."""
        ignore_sigint()


def workers_log() -> str:
    """Where an embedded cluster's worker processes write their stderr."""
    return os.path.join(tempfile.gettempdir(), f"ntkdist-workers-{os.getpid()}.log")


def gpu_cluster(gpus: Sequence[str], x64: bool) -> SpecCluster:
    """A local cluster with one worker process per GPU, each seeing only its own.

    Each worker has ``CUDA_VISIBLE_DEVICES`` set to one device,
    ``JAX_PLATFORMS=cuda``, no memory preallocation (so several processes,
    the coordinator among them, can share a device), the ``GPU=1`` resource
    and two threads: one computes a tile on the GPU while the other writes
    the previous one.
    """
    env = {**jax_worker_env(x64), "JAX_PLATFORMS": "cuda"}
    workers = {
        f"gpu-{dev}": {
            "cls": Nanny,
            "options": {
                "nthreads": THREADS_PER_WORKER,
                "resources": {GPU_RESOURCE: 1},
                "env": {**env, "CUDA_VISIBLE_DEVICES": dev},
                "host": "127.0.0.1",
                "silence_logs": logging.CRITICAL,
            },
        }
        for dev in gpus
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": ":0"},
    }
    return SpecCluster(
        workers=workers,
        scheduler=scheduler,
        silence_logs=logging.CRITICAL,
        name="ntkdist-gpus",
    )


@final
class DaskExecutor(AbstractExecutor):
    """Run tiles on a Dask cluster, recording each as it finishes.

    With neither ``client`` nor ``address`` it starts an embedded cluster of
    worker processes and closes it afterwards: where JAX here sees GPUs, one
    worker per GPU pinned to it (:func:`gpu_cluster`), else a
    ``LocalCluster`` of one worker per core; each worker has two threads (one
    computes a tile while the other writes the last one). Params and the model are
    scattered once to every worker; tasks have keys ``ntk-<fp8>-<i>-<j>``,
    ``retries`` and a bounded window of futures.

    Args:
        client: an existing client (left open).
        address: a scheduler address to connect to.
        n_workers: workers of the embedded cluster (default: one per GPU
            where JAX sees GPUs, else one per core). On GPUs, at most one
            per GPU.
        x64: whether the job computes in float64 (sets the workers' JAX).
        window: futures in flight (default: 2 per worker thread).
        retries: retries of a failed task.
        resources: per-task resources, e.g. ``{"GPU": 1}`` on GPU clusters.
        stream: where the dashboard address is printed (``None``: stderr).
        verbose: print the dashboard address.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        address: str | None = None,
        n_workers: int | None = None,
        x64: bool = True,
        window: int | None = None,
        retries: int = RETRIES,
        resources: dict[str, float] | None = None,
        stream: TextIO | None = None,
        verbose: bool = True,
    ) -> None:
        """Configure; the cluster starts on ``__enter__``."""
        self._given = client
        self.address = address
        self.requested_workers = n_workers
        self.x64 = x64
        self.window = window
        self.retries = retries
        self.resources = resources
        self.stream = stream
        self.verbose = verbose
        self.client: Client | None = client
        self._cluster: LocalCluster | SpecCluster | None = None
        self._own_client = False

    def __enter__(self) -> DaskExecutor:
        """Connect to, or start, the cluster; register the JAX plugin."""
        try:
            self._start()
        except BaseException as err:  # Ctrl-C while starting: close what started
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _start(self) -> None:
        if self.client is None:
            if self.address is not None:
                self.client = Client(self.address)
            elif gpus := self._embedded_gpus():
                with children_stderr(workers_log()):
                    self._cluster = gpu_cluster(gpus, self.x64)
                self.client = Client(self._cluster)
            else:
                with children_stderr(workers_log()):
                    self._cluster = self._local_cluster()
                self.client = Client(self._cluster)
            self._own_client = True
        if self._cluster is not None:
            self.client.register_plugin(IgnoreSigint())
        self.client.register_plugin(JaxWorkerPlugin(self.x64))
        if self.verbose:
            link = self.client.dashboard_link or "(no dashboard: install bokeh)"
            out = self.stream or sys.stderr
            out.write(f"[ntkdist] Dask dashboard: {link}\n")
            out.flush()

    def _local_cluster(self) -> LocalCluster:
        return LocalCluster(
            n_workers=self.requested_workers or os.cpu_count() or 1,
            threads_per_worker=THREADS_PER_WORKER,
            processes=True,
            dashboard_address=":0",
            env=jax_worker_env(self.x64),
            # Failed tasks are reported by the coordinator, one
            # line per distinct error (tracebacks go to a log file).
            silence_logs=logging.CRITICAL,
        )

    def __exit__(self, kind: object, *exc: object) -> None:
        """Close what this executor started (quietly after an interrupt)."""
        if kind is not None and not (
            isinstance(kind, type) and issubclass(kind, Exception)
        ):
            with quiet_logs():  # KeyboardInterrupt: no shutdown noise
                self._close(CLOSE_TIMEOUT)
            return
        self._close(None)

    def _close(self, timeout: float | None) -> None:
        try:
            if self._own_client and self.client is not None:
                self.client.close(timeout=timeout)
        finally:
            self.client = None if self._own_client else self.client
            if self._cluster is not None:
                cluster, self._cluster = self._cluster, None
                cluster.close(timeout=timeout)

    @property
    def n_workers(self) -> int:
        """Worker processes of the cluster (each computes one tile at a time)."""
        if self.client is None:
            gpus = self._embedded_gpus()
            return len(gpus) or self.requested_workers or os.cpu_count() or 1
        return max(1, len(self.client.nthreads()))

    def _embedded_gpus(self) -> list[str]:
        """The GPUs an embedded cluster would use: none when one is given."""
        if self._given is not None or self.address is not None:
            return []
        gpus = local_gpus()
        return gpus[: self.requested_workers or len(gpus)]

    @property
    def n_threads(self) -> int:
        """Worker threads of the cluster (tasks that can be running at once)."""
        if self.client is None:
            return self.n_workers * THREADS_PER_WORKER
        return max(1, sum(self.client.nthreads().values()))

    def run(
        self,
        spec: TileSpec,
        model: Model,
        params: Any,
        todo: Sequence[Tile],
        on_done: OnDone,
    ) -> list[tuple[Tile, BaseException]]:
        """Submit tiles through a bounded window; record each as it completes."""
        if self.client is None:
            raise RuntimeError("DaskExecutor.run needs `with DaskExecutor(...)`.")
        client = self.client
        if not todo:
            return []
        payload = ByValue.of(model, params)
        box = {"shared": client.scatter([payload], broadcast=True, hash=False)[0]}
        fp8 = spec.fingerprint[:8]
        window = self.window or WINDOW_PER_THREAD * self.n_threads
        pending = iter(todo)
        owner: dict[str, Tile] = {}
        inflight: dict[str, Any] = {}
        failures: list[tuple[Tile, BaseException]] = []
        queue = as_completed()

        attempts: dict[Tile, int] = {}

        def submit(tile: Tile) -> None:
            n = attempts.get(tile, 0)
            suffix = f"-r{n}" if n else ""
            fut = client.submit(
                run_tile,
                tile,
                spec,
                box["shared"],
                key=f"ntk-{fp8}-{tile.i}-{tile.j}{suffix}",
                pure=False,
                retries=self.retries,
                resources=self.resources,
            )
            owner[fut.key] = tile
            inflight[fut.key] = fut
            queue.add(fut)

        for tile in islice(pending, window):
            submit(tile)
        try:
            for fut in queue:
                tile = owner.pop(fut.key)
                del inflight[fut.key]
                value, err = None, None
                if fut.status == "finished":
                    try:  # its result may have lived on a worker that is gone
                        value = fut.result()
                    except Exception as e:
                        err = e
                else:
                    err = _error_of(fut)
                lost = err is not None and _lost(fut, err)
                fut.release()
                if isinstance(value, WriteFault):
                    # Read-only or full: every other tile would fail alike.
                    failures.append((tile, value.error()))
                    break
                if err is None:
                    on_done(tile, value)
                elif lost and attempts.get(tile, 0) < LOST_RESUBMITS:
                    self._event("lost", tile, err)
                    # The tile's worker went away (its link was cut, it was
                    # killed): tiles are idempotent, so run it again elsewhere.
                    attempts[tile] = attempts.get(tile, 0) + 1
                    if box["shared"].status != "finished":  # its copies were lost too
                        box["shared"].release()
                        box["shared"] = client.scatter(
                            [payload], broadcast=True, hash=False
                        )[0]
                    submit(tile)
                    continue
                else:
                    failures.append((tile, err))
                    self._event("failed", tile, err)
                nxt = next(pending, None)
                if nxt is not None:
                    submit(nxt)
        finally:
            if inflight:  # interrupted: leave nothing running on a shared cluster
                client.cancel(list(inflight.values()))
            box["shared"].release()
        return failures


def _lost(fut: Any, err: BaseException) -> bool:
    """Whether a future failed because its worker was lost, not by its own code."""
    if fut.status in ("lost", "cancelled"):
        return True
    lost = (KilledWorker, CommClosedError, FutureCancelledError, asyncio.CancelledError)
    return isinstance(err, lost) or (
        isinstance(err, RuntimeError) and str(err) == "None"
    )


def _error_of(fut: Any) -> BaseException:
    try:
        err = fut.exception()
    except BaseException as e:  # cancelled futures raise here
        return e
    if not isinstance(err, BaseException):
        return RuntimeError(str(err))
    try:  # the worker's traceback, for the job's log file
        tb = fut.traceback()
    except Exception:
        tb = None
    return err.with_traceback(tb) if tb is not None else err
