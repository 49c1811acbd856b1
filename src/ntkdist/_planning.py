"""Planning a job: the measurements (jax) the pure planner is given.

:func:`plan_job` plans each candidate strategy (:mod:`ntkdist._tuning`: its cost
model, tiles and ``structured``'s rules), and with a probe compiles the chosen
tile's programs to size the worker on the buffers XLA assigns them
(:func:`compiled_bytes`) and times them to predict the wall time.
:func:`plan_to_run` is the plan ``compute`` executes: a resumed store keeps its
tile, cache level and strategy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError, ModelError, PlanError
from ._job import Job, with_strategy
from ._machine import (
    MEMORY_FRACTION as MEMORY_FRACTION,
    disk_space,
    parallel_over as parallel_over,
    worker_memory,
)
from ._planner import CostModel, Plan
from ._planner._budget import round_up, smaller_output
from ._tuning import (
    COST_PROBE as COST_PROBE,
    _default_structured,
    _plan_one,
    _plan_tuned,
    cost_model as cost_model,
)
from ._units import format_bytes, parse_bytes
from .kernels import STRATEGIES, StructuredDerivatives, check_supported, get
from .kernels._choose import from_record
from .kernels._jit import (
    buffer_bytes,
    contract_fn,
    factors_fn,
)
from .storage import StoreSpec

# Probe side timed to measure the FLOP rates when the plan's tile is costly.
RATE_PROBE = 256
# Tiles up to this many FLOPs (both factor passes and the contraction) are
# probed at their own shape, so the probe compiles the programs the tiles run.
PROBE_FLOPS = 1e11
# Tiles compiled at most while a sized tile is shrunk to fit its programs.
FIT_ROUNDS = 5


def probe_sides(plan: Plan, cost: CostModel) -> tuple[int, int]:
    """The blocks the rate probe times: the plan's tile where it is cheap.

    A tile of at most ``PROBE_FLOPS`` is probed at its own shape: the probe
    then compiles the very programs the tiles run (jit's cache keeps them),
    so the first tile does not compile again. A costlier tile is probed at
    ``RATE_PROBE`` samples a side (or its own, if smaller).
    """
    r, c = plan.tile_rows, plan.tile_cols
    if cost.tile_flops(r, c) <= PROBE_FLOPS:
        return r, c
    p = min(r, c, RATE_PROBE)
    return p, p


def measure_rate(job: Job, plan: Plan, cost: CostModel) -> tuple[float, float | None]:
    """FLOP/s of contractions and of factor passes, measured here.

    Uses the jitted functions the workers run, on the blocks of
    :func:`probe_sides` (each compiled first, then timed once). The factor
    rate is ``None`` for strategies whose factors cost nothing.
    """
    p1, p2 = probe_sides(plan, cost)  # at most each input's samples
    x1 = jnp.asarray(np.asarray(job.x1[:p1]))
    args = (job.strategy, job.model, job.output, job.params)

    def timed(fn: Any, *a: Any) -> tuple[Any, float]:
        fn.lower(*args, *a).compile()  # jit's cache keeps it for the tiles
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, *a))
        return out, max(time.perf_counter() - t0, 1e-9)

    f1, t_factors = timed(factors_fn, x1)
    # Blocks of one shape (a symmetric job's): time one block's factors
    # against themselves, the work of any other pair.
    f2 = f1
    if job.x2 is not None and (p1, job.x1.dtype) != (p2, job.x2.dtype):
        x2 = jnp.asarray(np.asarray(job.x2[:p2]))
        f2 = jax.block_until_ready(factors_fn(*args, x2))
    _, t_contract = timed(contract_fn, f1, f2)
    c, a, _, d = cost.flops
    factor_rate = a * p1 / t_factors if a > 0 else None
    return max(0.0, c + d * p1 * p2) / t_contract, factor_rate


def compiled_bytes(job: Job, rows: int, cols: int) -> float | None:
    """Peak bytes of one ``rows × cols`` tile's programs, as XLA assigns them.

    Compiles the factor pass of each side and the contraction for the tile's
    shapes (jit's cache keeps them for the tiles), without running them. A
    worker holds the first block's factors while the second's are computed,
    then both with the contraction's own buffers: the peak is the larger of
    the two. ``None`` where the backend reports no buffer assignment.
    """
    args = (job.strategy, job.model, job.output, job.params)

    def block(x: Any, n: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(
            (n, *x.shape[1:]), jax.dtypes.canonicalize_dtype(x.dtype)
        )

    s1 = block(job.x1, rows)
    s2 = s1 if job.x2 is None else block(job.x2, cols)
    f1 = jax.eval_shape(lambda x: factors_fn(*args, x), s1)
    f2 = f1 if s2 == s1 else jax.eval_shape(lambda x: factors_fn(*args, x), s2)
    second = buffer_bytes(factors_fn.lower(*args, s2).compile())
    contraction = buffer_bytes(contract_fn.lower(*args, f1, f2).compile())
    if second is None or contraction is None:
        return None
    held = sum(
        math.prod(v.shape) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(f1)
    )
    return max(float(held) + second, contraction)


def _fit_compiled(
    job: Job, plan: Plan, cost: CostModel, args: tuple[Any, ...]
) -> tuple[Plan, CostModel]:
    """``plan`` sized on its tile's compiled programs rather than the model.

    The cost model's bytes are calibrated to what XLA assigns the tile's
    programs (:func:`compiled_bytes`) and the job is planned again with it:
    the same tile where it fits, else (a tile the planner sized) a smaller
    one, compiled and checked in turn. A tile given by hand that does not fit
    is refused with the largest that does. Measured on in-process jobs of CIFAR
    ResNet-18 and ViT-tiny in tiles of 16 to 128, the model's estimate was
    0.90–1.76 times the peak, the compiled figure's 0.98–1.16 times.
    """
    tile, rest = args[0], args[1:]
    points: list[tuple[int, int, float]] = []
    calibrated = cost
    for _ in range(FIT_ROUNDS):
        rows, cols = plan.tile_rows, plan.tile_cols
        compiled = compiled_bytes(job, rows, cols)
        if compiled is None:
            return plan, cost
        points.append((rows, cols, compiled))
        calibrated = cost.calibrated(points)
        cap = (
            plan.memory_budget if plan.memory_budget is not None else plan.memory_limit
        )
        keep = (
            tile is not None
            or cap is None
            or calibrated.worker_bytes(rows, cols) <= cap
            or plan.tile == 1
        )
        plan, _ = _plan_one(job, plan.tile if keep else None, *rest, cost=calibrated)
        if keep:
            return dataclasses.replace(plan, compiled_bytes=compiled), calibrated
    return plan, calibrated


def _retune_compiled(
    job: Job, plan: Plan, cost: CostModel, args: tuple[Any, ...]
) -> tuple[Job, Plan, CostModel]:
    """``structured`` with the richest rules whose compiled programs fit a given tile.

    :func:`_plan_tuned` falls back to the rules of ever smaller tiles until
    the estimate fits; the estimate errs high, so the rules between the
    tile's own and those are compiled and checked here, richest first (a
    ViT-tiny ``trace`` tile of 128: the rules of 2-sample tiles, 11.4 TFLOP a
    tile, where those of 8-sample tiles, 3.6 TFLOP, fit this machine).
    """
    tile, rest = args[0], args[1:]
    nominal = max(1, tile)
    while nominal > job.strategy.nominal_tile:
        cand = with_strategy(job, StructuredDerivatives(nominal_tile=nominal))
        compiled = compiled_bytes(cand, plan.tile_rows, plan.tile_cols)
        if compiled is None:
            break
        fitted = cost_model(cand).calibrated(
            [(plan.tile_rows, plan.tile_cols, compiled)]
        )
        try:
            better, _ = _plan_one(cand, tile, *rest, cost=fitted)
        except PlanError:
            nominal //= 4
            continue
        return cand, dataclasses.replace(better, compiled_bytes=compiled), fitted
    return job, plan, cost


def plan_job(
    job: Job,
    *,
    tile: int | None = None,
    memory_budget: Any = None,
    workers: int = 1,
    probe: bool = True,
    cache: str = "auto",
    disk_dir: str | None = None,
    tune: bool = True,
) -> tuple[Job, Plan]:
    """Size tiles for ``job`` and predict its figures (no store is touched).

    With ``strategy="auto"`` every strategy is planned for the whole job
    (tiles, factor reuse, memory budget) and the one with the smallest
    predicted time wins; the returned job carries it. With ``tune``,
    ``structured`` chooses its per-weight rules for the tiles it gets (see
    :func:`_tune_nominal`).
    """
    candidates = [job]
    if job.auto:
        candidates = [with_strategy(job, get(name)) for name in STRATEGIES]
    plans: list[tuple[float, int, Job, Plan, CostModel, bool]] = []
    errors: list[PlanError] = []
    needs: dict[str, float] = {}  # auto: what each strategy's smallest tile needs
    budget = parse_bytes(memory_budget)
    limit = worker_memory(workers) if budget is None else None
    disk = disk_space(disk_dir)
    for k, cand in enumerate(candidates):
        # auto: a strategy that cannot handle the model is no candidate. Its
        # support is checked only where it matters (below, in cost order), as
        # tracing one costs about as much as planning it.
        checked = cand.strategy is job.strategy
        try:
            cand, p, cost = _plan_tuned(
                cand, (tile, budget, workers, cache, limit, disk), tune
            )
        except PlanError as e:
            if not checked and not _supported(cand):
                continue
            errors.append(e)
            side = 1 if tile is None else max(1, min(tile, max(cand.n1, cand.n2)))
            needs[cand.strategy.name] = cost_model(cand).worker_bytes(side, side)
            continue
        except Exception:
            if checked or _supported(cand):
                raise
            continue
        # Ties go to structured (the first among equals below).
        rank = 0 if cand.strategy.name == "structured" else 1 + k
        plans.append((p.nominal_seconds, rank, cand, p, cost, checked))
    plans.sort(key=lambda t: (t[0], t[1]))
    chosen = next((t for t in plans if t[5] or _supported(t[2])), None)
    if chosen is None:
        if job.auto and needs and budget is not None:
            raise _auto_refusal(job, tile, budget, needs)
        raise errors[0]
    # ``structured``'s rules were chosen here (not given): a given tile whose
    # default rules the estimate did not fit may take richer ones that do.
    retune = tune and tile is not None and (job.auto or _default_structured(job))
    _, _, job, best, cost, _ = chosen
    if probe:
        args = (tile, budget, workers, cache, limit, disk)
        if retune and isinstance(job.strategy, StructuredDerivatives):
            job, best, cost = _retune_compiled(job, best, cost, args)
        if best.compiled_bytes is None:  # not already sized on its programs
            best, cost = _fit_compiled(job, best, cost, args)
        rate, factor_rate = measure_rate(job, best, cost)
        best = dataclasses.replace(
            best,
            flop_rate=rate,
            factor_rate=factor_rate,
            parallel=parallel_over(workers),
        )
    return job, best


def _supported(job: Job) -> bool:
    """Whether ``job``'s strategy can compute its model's kernel (traced once)."""
    try:
        check_supported(job.strategy, job.model, job.params, job.probe, job.output)
    except ModelError:
        return False
    return True


def _auto_refusal(
    job: Job, tile: int | None, budget: float, needs: dict[str, float]
) -> PlanError:
    """No strategy fits: what auto tried, and the smallest budget that works."""
    side = "one 1×1 tile" if tile is None else f"a {tile}×{tile} tile"
    tried = ", ".join(
        f"{k} (needs at least {format_bytes(v)})" for k, v in needs.items()
    )
    best = min(needs, key=lambda k: needs[k])
    return PlanError(
        f"memory_budget={format_bytes(budget)} cannot hold {side} of "
        f"output={job.output!r} with any strategy: strategy='auto' tried "
        f"{tried} per worker. The smallest budget that works is "
        f"{format_bytes(round_up(needs[best]))} (with {best}); raise memory_budget "
        "to at "
        "least that" + smaller_output(job.output) + "."
    )


def plan_to_run(
    job: Job,
    *,
    tile: int | None,
    memory_budget: Any,
    workers: int,
    cache: str,
    stored: StoreSpec | None = None,
    given: Plan | None = None,
    probe: bool = False,
    disk_dir: str | None = None,
) -> tuple[Job, Plan]:
    """The plan ``compute`` executes, and the job with its strategy.

    ``given`` (a plan from :func:`ntkdist.plan`) is executed as it is, once
    checked against the job. Otherwise the job is planned as ``plan`` plans
    it, except that a resumed store (``stored``) keeps its tile, its cache
    level and, under ``strategy="auto"``, its strategy. ``probe`` times a
    probe tile here to predict the wall time.

    Raises:
        InputError: ``given`` was made for another job.
        PlanError: no tile fits ``memory_budget``.
    """
    if given is not None:
        return _adopt(job, given), given
    if stored is not None:
        tile = stored.plan.tile if tile is None else tile
        if cache == "auto":
            cache = stored.plan.cache
        if stored.strategy in STRATEGIES and (
            job.auto or job.strategy == get(stored.strategy)
        ):  # the instance the store was computed with (structured's rules)
            job = with_strategy(job, from_record(stored.strategy, stored.strategy_repr))
    return plan_job(
        job,
        tile=tile,
        memory_budget=memory_budget,
        workers=workers,
        probe=probe,
        cache=cache,
        disk_dir=disk_dir,
        tune=stored is None,
    )


def _adopt(job: Job, plan: Plan) -> Job:
    """``job`` with ``plan``'s strategy, once the plan is checked to be its plan."""
    want = {
        "n1": job.n1,
        "n2": job.n2,
        "out_dim": job.out_dim,
        "output": job.output,
        "symmetric": job.x2 is None,
        "dtype": job.dtype,
    }
    differ = [
        f"{k} is {getattr(plan, k)!r} in the plan but {v!r} here"
        for k, v in want.items()
        if getattr(plan, k) != v
    ]
    if differ:
        raise InputError(
            f"plan= was made for another job: {', '.join(differ)}. Make the plan "
            "with ntkdist.plan and the same arguments."
        )
    if job.auto and plan.strategy in STRATEGIES:
        return with_strategy(job, from_record(plan.strategy, plan.strategy_repr))
    if plan.strategy in STRATEGIES and job.strategy == get(plan.strategy):
        return with_strategy(job, from_record(plan.strategy, plan.strategy_repr))
    if job.strategy.name != plan.strategy:
        raise InputError(
            f"plan= computes with strategy {plan.strategy!r} but strategy="
            f"{job.strategy!r} was given; pass the plan's strategy or 'auto'."
        )
    return job
