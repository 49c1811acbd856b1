"""Planning one strategy: its cost model, its plan, and ``structured``'s rules.

:func:`cost_model` evaluates the strategy's cost at four small tile sizes to
fit a :class:`~ntkdist._planner.CostModel`; :func:`_plan_one` asks
:func:`~ntkdist._planner.make_plan` for the tiles and figures; the rest chooses
``structured``'s per-weight rules for the tiles it gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._errors import PlanError
from ._job import Job, with_strategy
from ._planner import CostModel, Plan, make_plan
from .kernels import StructuredDerivatives, tile_shape
from .kernels._jit import factor_bytes_per_sample

# Tile sides at which a strategy's cost is evaluated to fit the cost model.
COST_PROBE = 16


def cost_model(job: Job) -> CostModel:
    """Fit the strategy's cost of an ``n1 × n2`` tile from four of its estimates."""
    s = COST_PROBE
    x = jnp.asarray(job.probe)
    samples = {}
    for a in (s, 2 * s):
        for b in (s, 2 * s):
            c = job.strategy.cost(job.model, job.params, x, a, b, job.output)
            samples[(a, b)] = (float(c.flops), float(c.bytes))
    out_items = int(np.prod(tile_shape(job.output, 1, 1, job.out_dim)))
    feature = (
        int(np.prod(job.x1.shape[1:], dtype=np.int64)) * np.dtype(job.x1.dtype).itemsize
    )
    return CostModel.fit(
        samples,
        out_items=out_items,
        itemsize=np.dtype(job.dtype).itemsize,
        feature_bytes=feature,
    )


def _plan_tuned(
    job: Job, args: tuple[Any, ...], tune: bool
) -> tuple[Job, Plan, CostModel]:
    """:func:`_plan_one`, then (``tune``) :func:`_tune_nominal`.

    A given tile that the default ``structured`` rules do not fit in memory
    is planned again with the rules chosen for that tile, then for ever
    smaller ones, which hold fewer per-weight Jacobian rows (a ResNet-18
    ``trace`` tile of 64: 29.5 GiB of predicted memory with the rules for
    256-sample tiles, 11.5 GiB with those for 64); the first that fits wins.
    """
    tile = args[0]
    try:
        p, cost = _plan_one(job, *args)
    except PlanError:
        if not (tune and tile is not None and _default_structured(job)):
            raise
        nominal = max(1, tile)
        while True:
            cand = with_strategy(job, StructuredDerivatives(nominal_tile=nominal))
            try:
                p, cost = _plan_one(cand, *args)
            except PlanError:
                if nominal == 1:
                    raise
                nominal = max(1, nominal // 4)
                continue
            return cand, p, cost
    if tune:
        return _tune_nominal(job, p, cost, args)
    return job, p, cost


def _default_structured(job: Job) -> bool:
    """Whether ``job`` runs ``structured`` with its default per-weight rules."""
    return (
        isinstance(job.strategy, StructuredDerivatives)
        and job.strategy == StructuredDerivatives()
    )


def _tune_nominal(
    job: Job, plan: Plan, cost: CostModel, args: tuple[Any, ...]
) -> tuple[Job, Plan, CostModel]:
    """``structured`` with its per-weight rules chosen for the tiles it gets.

    The default instance chooses rows or gram for 256-sample tiles; where the
    memory allows smaller tiles (a ResNet-18 on a CPU worker: 21 samples), the
    rules are chosen again for the planned tile, which changes the tile, up to
    three times; the plan with the fewest FLOPs is kept. An instance with its
    own nominal tile or mode is kept as it is.
    """
    if not _default_structured(job):
        return job, plan, cost
    best = (job, plan, cost)
    seen = {job.strategy.nominal_tile}
    for _ in range(3):
        r, c = plan.tile_rows, plan.tile_cols
        nominal = max(1, round(2 * r * c / (r + c)))
        if nominal in seen or nominal >= StructuredDerivatives.nominal_tile:
            break
        seen.add(nominal)
        cand = with_strategy(job, StructuredDerivatives(nominal_tile=nominal))
        try:
            plan, cost = _plan_one(cand, *args)
        except PlanError:
            break
        if plan.total_flops < best[1].total_flops:
            best = (cand, plan, cost)
    return best


def _plan_one(
    job: Job,
    tile: int | None,
    memory_budget: float | None,
    workers: int,
    cache: str,
    memory_limit: float | None = None,
    disk_limit: float | None = None,
    cost: CostModel | None = None,
) -> tuple[Plan, CostModel]:
    """The plan of ``job`` with its own strategy, and that strategy's cost
    model (``cost``: this one instead of the strategy's)."""
    cost = cost_model(job) if cost is None else cost
    per_sample = factor_bytes_per_sample(
        job.strategy,
        job.model,
        job.params,
        tuple(job.probe.shape[1:]),
        job.probe.dtype,
        job.output,
    )
    the_plan = make_plan(
        n1=job.n1,
        n2=job.n2,
        out_dim=job.out_dim,
        output=job.output,
        symmetric=job.x2 is None,
        dtype=job.dtype,
        strategy=job.strategy.name,
        cost=cost,
        tile=tile,
        memory_budget=memory_budget,
        memory_limit=memory_limit,
        disk_limit=disk_limit,
        workers=workers,
        factor_bytes_per_sample=per_sample,
        cache=cache,
    )
    return dataclasses.replace(the_plan, strategy_repr=repr(job.strategy)), cost
