"""Where ``compute`` runs a job, and what it says before the first tile.

A Dask cluster costs seconds to start (each worker process imports JAX, and
compiles the tile functions again) before its first tile. ``executor="auto"``
therefore runs a job in this process (the serial executor: same store, same
resume) when the plan predicts that its tiles take less than
``IN_PROCESS_SECONDS`` there, and on the embedded cluster otherwise. A worker
count, a scheduler, a client or ``executor="dask"`` always means a cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TextIO

from ._job import Job
from ._planner import Plan
from ._planning import parallel_over, plan_to_run
from ._units import format_bytes
from .executors import AbstractExecutor
from .storage import KernelStore, StoreSpec, store_state

# Predicted seconds of tiles in one process below which ``auto`` runs a job
# in-process: about what an embedded cluster takes to start its workers and
# compile in each of them (5-10 s on a laptop, more on a loaded node).
IN_PROCESS_SECONDS = 20.0
# Seconds each tile costs beyond the plan's FLOPs and bytes (its task, its
# chunk and marker writes): what makes a job of many small tiles slow.
TILE_OVERHEAD_SECONDS = 0.015


def tiles_left(path: str, fields: dict[str, str], plan: Plan) -> int:
    """Tiles of ``plan`` a run at ``path`` still computes (all, for a new store)."""
    if store_state(path) != "ntkdist":
        return plan.n_tiles
    try:
        kstore = KernelStore.open(path)
        if kstore.fields != fields:
            return plan.n_tiles
        done, total = kstore.progress()
    except Exception:
        return plan.n_tiles
    return max(0, total - done)


def plan_and_choose(
    job: Job,
    *,
    executor: str | AbstractExecutor | None,
    make: Callable[[Any], AbstractExecutor],
    forced: bool,
    tile: int | None,
    memory_budget: Any,
    cache: str,
    stored: StoreSpec | None,
    given: Plan | None,
    left: Callable[[Job, Plan], int],
    probe: bool,
    disk_dir: str | None = None,
) -> tuple[Job, Plan, AbstractExecutor, str]:
    """The job, its plan, the executor it runs on, and why (``""``: no choice).

    ``make(name)`` builds an executor (not started) as ``make_executor`` does;
    ``left(job, plan)`` counts the tiles a run still computes. ``forced`` (a
    worker count, scheduler or client given) rules the in-process run out.
    """
    if executor == "auto" and not forced:
        job1, plan1 = plan_to_run(
            job,
            tile=tile,
            memory_budget=memory_budget,
            workers=1,
            cache=cache,
            stored=stored,
            given=given,
            probe=True,
            disk_dir=disk_dir,
        )
        seconds = _seconds_left(plan1, left(job1, plan1))
        in_process, where = _verdict(seconds)
        if in_process:
            return job1, plan1, make("serial"), f"runs {where}"
        runner = make("dask")
        job, the_plan = plan_to_run(
            job,
            tile=tile,
            memory_budget=memory_budget,
            workers=runner.n_workers,
            cache=cache,
            stored=stored,
            given=given,
            disk_dir=disk_dir,
        )
        if the_plan.strategy == plan1.strategy and plan1.flop_rate:
            the_plan = dataclasses.replace(
                the_plan,
                flop_rate=plan1.flop_rate,
                factor_rate=plan1.factor_rate,
                parallel=parallel_over(runner.n_workers),
            )
        return job, the_plan, runner, f"runs {where}"
    runner = make("dask" if executor == "auto" else executor)
    job, the_plan = plan_to_run(
        job,
        tile=tile,
        memory_budget=memory_budget,
        workers=runner.n_workers,
        cache=cache,
        stored=stored,
        given=given,
        probe=probe,
        disk_dir=disk_dir,
    )
    return job, the_plan, runner, ""


def _seconds_left(plan: Plan, left: int) -> float | None:
    """Predicted seconds of the ``left`` tiles still to compute."""
    est = plan.est_seconds
    if est is None:
        return None
    per_tile = est / max(1, plan.n_tiles) + TILE_OVERHEAD_SECONDS / plan.workers
    return per_tile * left


def where_compute_runs(plan: Plan) -> str | None:
    """What ``compute`` with ``executor="auto"`` would do with ``plan`` (a plan
    with a probe, for its workers); ``None`` where the plan has no time."""
    if plan.est_seconds is None:
        return None
    parallel = max(1, min(plan.parallel or plan.workers, plan.n_tiles))
    one = plan.est_seconds * parallel + TILE_OVERHEAD_SECONDS * plan.n_tiles
    return f"compute runs this job {_verdict(one)[1]}"


def _verdict(seconds: float | None) -> tuple[bool, str]:
    """Whether ``seconds`` of tiles in one process run in-process, and where
    the job runs in words (``"in-process: predicted 1.8 s of tiles, …"``)."""
    if seconds is not None and seconds < IN_PROCESS_SECONDS:
        return True, (
            f"in-process: predicted {_seconds(seconds)} of tiles, less than a "
            "cluster's start-up (--workers N, --scheduler or --executor dask "
            "force a cluster)"
        )
    return False, (
        "on a Dask cluster: predicted "
        + ("an unknown time" if seconds is None else _seconds(seconds))
        + f" of tiles in one process, at least {IN_PROCESS_SECONDS:.0f} s"
    )


def say_plan(out: TextIO, plan: Plan, left: int, why: str) -> None:
    """The plan in two or three lines, before the first tile."""
    est = _seconds_left(plan, left)
    todo = (
        f"{plan.n_tiles} tiles"
        if left == plan.n_tiles
        else f"{left} of {plan.n_tiles} tiles left"
    )
    when = (
        "time not predicted"
        if est is None
        else f"predicted {_seconds(est)} of tiles "
        + (
            "in this process, plus compilation"
            if plan.workers == 1
            else f"on {plan.workers} workers, plus start-up and compilation"
        )
    )
    out.write(
        f"[ntkdist] plan: {plan.output} {plan.n1}×{plan.n2} (O={plan.out_dim}, "
        f"{plan.dtype}), {todo} of {plan.tile_rows}×{plan.tile_cols}, strategy "
        f"{plan.strategy}, factors cached: {plan.cache}\n"
        f"[ntkdist] {when}; peak memory "
        f"{format_bytes(plan.peak_bytes_per_worker)}/worker; "
        f"{format_bytes(plan.bytes_on_disk)} on disk\n"
    )
    if why:
        out.write(f"[ntkdist] {why}\n")
    out.flush()


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"
