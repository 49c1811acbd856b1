"""Running a planned job: the executor, the store's lifecycle, the tile loop.

``compute`` and ``repair`` (in :mod:`ntkdist._api`) are short: they prepare a
job, plan it (:mod:`ntkdist._planning`), and hand it here. This module locks
the store, creates it or checks that it holds the same job, runs the tiles
that lack a marker, and records each as it finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import jax
import numpy as np
import zarr

from ._errors import ExecutionError, InputError, StoreError, StoreWriteError
from ._job import Job
from ._model import Model
from ._planner import Plan, Tile
from ._report import Reporter, first_line
from ._version import __version__
from .executors import (
    AbstractExecutor,
    InputSource,
    Progress,
    SerialExecutor,
    TileSpec,
)
from .executors._factors import create_factor_stores, forget_job
from .kernels import STRATEGIES, AbstractKernelStrategy
from .kernels._choose import from_record
from .storage import (
    InputRecord,
    KernelStore,
    StoreLock,
    StoreSpec,
    check_same_job,
    digest,
    fingerprint,
    is_url,
    remove_store,
    resume_words,
    store_state,
)
from .storage._space import bytes_needed, check_writable, fault_message, is_fatal


def make_executor(
    executor: str | AbstractExecutor | None,
    *,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    x64: bool = True,
    window: int | None = None,
    retries: int = 3,
    resources: dict[str, float] | None = None,
    stream: TextIO | None = None,
    verbose: bool = True,
) -> AbstractExecutor:
    """The executor ``compute`` runs on: the instance given, serial, or Dask.

    Raises:
        InputError: ``executor`` is neither a name nor an executor.
    """
    if isinstance(executor, AbstractExecutor):
        return executor
    if executor == "serial":
        return SerialExecutor()
    if executor not in (None, "dask", "auto"):  # auto: compute chooses first
        raise InputError(
            f"executor={executor!r}; expected 'auto', 'dask', 'serial' or an "
            "AbstractExecutor instance."
        )
    from .executors._dask import DaskExecutor  # distributed: only when needed

    return DaskExecutor(
        client,
        address=scheduler,
        n_workers=workers,
        x64=x64,
        window=window,
        retries=retries,
        stream=stream,
        verbose=verbose,
        resources=resources,
    )


def stored_spec(path: str) -> StoreSpec | None:
    """The job spec of the store at ``path``, if one is there."""
    if store_state(path) != "ntkdist":
        return None
    return KernelStore.open(path).spec


@contextlib.contextmanager
def locked(path: str, out: TextIO | None = None) -> Iterator[StoreLock | None]:
    """Hold the store's lock (local stores; object stores have none).

    Taking over a stale lock is said on ``out`` (default stderr).

    Raises:
        StoreLockedError: another live job holds it.
        StoreError: the location cannot be written.
    """
    lock = None if is_url(path) else _acquire(path)
    if lock is not None and lock.took_over:
        stream = out or sys.stderr
        stream.write(f"[ntkdist] {lock.took_over}\n")
        stream.flush()
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _acquire(path: str) -> StoreLock:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        lock = StoreLock(path)
        lock.acquire()
    except PermissionError as err:
        raise StoreError(
            f"cannot write at {path}: {err.strerror or err} (the location is "
            "read-only for this user). Choose a writable store path."
        ) from err
    except (NotADirectoryError, FileNotFoundError) as err:
        raise StoreError(
            f"cannot create a store at {path}: {err}. Choose a path in an "
            "existing, writable directory."
        ) from err
    except OSError as err:
        if isinstance(err, StoreError):
            raise
        raise StoreError(f"cannot write at {path}: {err}.") from err
    return lock


def job_fields(job: Job, plan: Plan) -> dict[str, str]:
    """The fingerprint fields of ``job`` computed with ``plan``'s tiles."""
    return {**job.fields, "tile": digest(f"{plan.tile_rows}x{plan.tile_cols}")}


def finished(path: str, job: Job, plan: Plan) -> KernelStore | None:
    """The store at ``path``, opened read-only, if it holds ``job`` complete.

    A finished job needs no lock and no write (its directory may be
    read-only); anything else (absent, partial, another job) is ``None`` and
    goes the locked way, which creates, resumes or refuses it.
    """
    if store_state(path) != "ntkdist":
        return None
    try:
        kstore = KernelStore.open(path)
        if kstore.fields != job_fields(job, plan) or not kstore.complete:
            return None
    except Exception:
        return None
    return kstore


def create_or_resume(
    path: str,
    job: Job,
    plan: Plan,
    *,
    overwrite: bool,
    model_spec: str | None,
) -> KernelStore:
    """The store of ``job``: created, or the existing one if it holds the same job.

    Raises:
        ResumeMismatchError: the store holds another job (and not ``overwrite``).
        StoreError: the path holds something that is not a kernel store.
    """
    fields = job_fields(job, plan)
    described = {**job.described, "tile": f"{plan.tile_rows}x{plan.tile_cols}"}
    state = store_state(path)
    if state == "other":
        raise StoreError(
            f"the store path {path} already holds something that is not an ntkdist "
            "kernel store; it was left untouched. Choose another path (or remove "
            "it yourself)."
        )
    if state == "ntkdist":
        existing = KernelStore.open(path, mode="r+")
        if not overwrite:
            words = resume_words(existing, described, {"x1": job.x1, "x2": job.x2})
            check_same_job(existing.fields, fields, path, **words)
            return existing
        remove_store(path)
    inputs: dict[str, Any] = {}
    records: dict[str, InputRecord | None] = {}
    for name, x in (("x1", job.x1), ("x2", job.x2)):
        if x is None:
            records[name] = None
            continue
        root, where = _zarr_source(x) or ("", f"inputs/{name}")
        if not root:
            inputs[name] = x
        records[name] = InputRecord(
            root, where, tuple(int(s) for s in x.shape), str(np.dtype(x.dtype))
        )
    spec = StoreSpec(
        plan=plan,
        fields=fields,
        fingerprint=fingerprint(fields),
        described=described,
        strategy=job.strategy.name,
        strategy_repr=repr(job.strategy),
        precision=job.precision,
        model_spec=model_spec,
        model_name=_qualname(job.model.apply_fn),
        inputs=records,
        versions=_versions(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return KernelStore.create(path, plan=plan, spec=spec, inputs=inputs)


def _zarr_source(x: Any) -> tuple[str, str] | None:
    if not isinstance(x, zarr.Array):
        return None
    root = getattr(x.store, "root", None)
    if root is None:
        return None  # a memory store cannot be read by worker processes
    return os.fspath(root), x.path


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _versions() -> dict[str, str]:
    """The versions a store records; dask's from its metadata (an in-process
    job does not import dask, 0.1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        dask_version = version("dask")
    except PackageNotFoundError:
        dask_version = "unknown"
    return {
        "ntkdist": __version__,
        "jax": jax.__version__,
        "zarr": zarr.__version__,
        "dask": dask_version,
        "python": sys.version.split()[0],
    }


def tile_spec(
    kstore: KernelStore,
    strategy: AbstractKernelStrategy | None = None,
    cache: tuple[str, float] | None = None,
) -> TileSpec:
    """What every tile task of ``kstore`` is given.

    Raises:
        StoreError: the store records no ``x1``, or was computed with a custom
            strategy and none is given.
    """
    spec = kstore.spec

    def source(record: InputRecord | None) -> InputSource | None:
        if record is None:
            return None
        return InputSource(record.root or os.path.abspath(kstore.path), record.path)

    x1 = source(spec.inputs.get("x1"))
    if x1 is None:
        raise StoreError(f"the store at {kstore.path} records no x1 input.")
    if strategy is None and spec.strategy not in STRATEGIES:
        raise StoreError(
            f"the store was computed with a custom strategy {spec.strategy_repr}; "
            "recompute with ntkdist.compute and the same strategy instance."
        )
    p = kstore.plan
    return TileSpec(
        store=os.path.abspath(kstore.path),
        x1=x1,
        x2=source(spec.inputs.get("x2")),
        output=p.output,
        strategy=strategy or from_record(spec.strategy, spec.strategy_repr),
        tile_rows=p.tile_rows,
        tile_cols=p.tile_cols,
        dtype=p.dtype,
        fingerprint=kstore.fingerprint,
        model_key=kstore.fields.get("model", ""),
        cache=cache[0] if cache else p.cache,
        cache_bytes=cache[1] if cache else p.cache_bytes,
        precision=spec.precision,
    )


def remove_leftovers(kstore: KernelStore, *, out: TextIO, progress: bool) -> int:
    """Delete the ``*.partial`` files of chunk writes a killed job left behind.

    Called with the store's lock held, so no live writer owns them.
    """
    gone = kstore.remove_partial_files()
    if gone and progress:
        out.write(
            f"[ntkdist] removed {len(gone)} unfinished chunk write(s) (*.partial) "
            "left by an interrupted job\n"
        )
        out.flush()
    return len(gone)


def run_tiles(
    kstore: KernelStore,
    model: Model,
    params: Any,
    todo: Sequence[Tile],
    runner: AbstractExecutor,
    *,
    progress: bool,
    out: TextIO,
    strategy: AbstractKernelStrategy | None = None,
    cache: tuple[str, float] | None = None,
    lock: StoreLock | None = None,
) -> None:
    """Run ``todo`` on ``runner``, writing each finished tile's marker.

    With ``lock``, each marker is written only while the lock is still this
    job's.

    Raises:
        ExecutionError: tiles failed (finished ones stay recorded).
        LockLostError: another job took the lock over.
    """
    remove_leftovers(kstore, out=out, progress=progress)
    done, total = kstore.progress()
    if progress:
        out.write(
            f"[ntkdist] store {kstore.path}: {done}/{total} tiles done, "
            f"computing {len(todo)}\n"
        )
        out.flush()
    if not todo:
        return
    kernel_dir = _kernel_dir(kstore)
    chunks, itemsize = tuple(kstore.kernel.chunks), kstore.kernel.dtype.itemsize
    if kernel_dir is not None:
        check_writable(kernel_dir, chunks, itemsize, list(todo))
    spec = tile_spec(kstore, strategy, cache)
    if spec.model_key:  # the model hash is the jaxpr over the params' leaves:
        # functions of differently structured params (``p``, ``p["w"]``) can
        # share it, not their model object, in a worker's model cache.
        treedef = jax.tree_util.tree_structure(params)
        spec = dataclasses.replace(spec, model_key=f"{spec.model_key}|{treedef}")
    if spec.cache == "store":
        create_factor_stores(spec, kstore.plan.grid, model, params)

    with runner:
        bar = Progress(done=done, total=total, stream=out, enabled=progress)
        bar.rate.warmup = runner.n_workers  # each worker's first tile compiles
        report = Reporter(kstore.path, bar, out, runner)
        runner.on_event = report

        def on_done(tile: Tile, checksums: tuple[int, int]) -> None:
            if lock is not None:
                lock.check()
            try:
                kstore.write_marker(tile, checksums)
            except OSError:
                # Paused mid-write past the lock's timeout: the job that took
                # the store over removed this write's temporary file.
                if lock is not None:
                    lock.check()
                raise
            report.tick()
            bar.advance()

        try:
            failures = runner.run(spec, model, params, todo, on_done)
        except OSError as err:  # a marker write: the store is read-only or full
            if not is_fatal(err) or isinstance(err, StoreError):
                raise
            failures = [(todo[0], err)]
        finally:
            runner.on_event = None
        bar.close()
        if spec.cache != "none":
            _forget(runner, spec)
    if failures and lock is not None:
        lock.check()  # a chunk write lost to a job that took the store over
    fatal = [err for _, err in failures if is_fatal(err)]
    if fatal:
        left = kstore.todo()
        raise StoreWriteError(
            fault_message(
                fatal[0],
                kernel_dir or kstore.path,
                bytes_needed(chunks, itemsize, left),
                len(left),
            )
        ) from fatal[0]
    if failures:
        tile, err = failures[0]
        logged = f"; full tracebacks in {report.log}" if report.logged else ""
        raise ExecutionError(
            f"{len(failures)} of {len(todo)} tiles failed (first: tile {tile.key}, "
            f"{first_line(err)}{logged}). Finished tiles are recorded; run the "
            "same job again to compute only the missing ones."
        ) from err


def _kernel_dir(kstore: KernelStore) -> str | None:
    """The local directory of the kernel's chunks (``None`` for object stores)."""
    if is_url(kstore.path):
        return None
    return os.path.join(os.path.abspath(kstore.path), *kstore.kernel.path.split("/"))


def _forget(runner: AbstractExecutor, spec: TileSpec) -> None:
    """Free the job's cached factors in every process that computed tiles."""
    forget_job(spec.fingerprint, spec.store)
    client = getattr(runner, "client", None)
    if client is not None:
        with contextlib.suppress(Exception):  # a worker gone meanwhile is fine
            client.run(forget_job, spec.fingerprint, spec.store)
