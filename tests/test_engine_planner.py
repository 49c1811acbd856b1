"""The planner: tiles, budgets and plans (pure Python, property-tested)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdist import PlanError
from ntkdist._planner import CostModel, Plan, largest_tile_within, make_plan, tiles
from ntkdist._planner._budget import WORKER_BASELINE_BYTES
from ntkdist._units import format_bytes


@settings(max_examples=60, deadline=None)
@given(
    n1=st.integers(1, 40),
    n2=st.integers(1, 40),
    t1=st.integers(1, 12),
    t2=st.integers(1, 12),
    symmetric=st.booleans(),
)
def test_tiles_cover_every_entry_exactly_once(n1, n2, t1, t2, symmetric):
    if symmetric:
        n2, t2 = n1, t1
    cover = np.zeros((n1, n2), int)
    for t in tiles(n1, n2, t1, t2, symmetric):
        (r0, r1), (c0, c1) = t.rows, t.cols
        assert 0 < r1 - r0 <= t1 and 0 < c1 - c0 <= t2
        assert (r0, c0) == (t.i * t1, t.j * t2)
        cover[r0:r1, c0:c1] += 1
        if t.kind == "mirror":
            assert symmetric and t.i < t.j
            cover[c0:c1, r0:r1] += 1
        assert (t.kind == "diagonal") == (symmetric and t.i == t.j)
    assert (cover == 1).all()


def test_tiles_are_row_major_so_row_factors_are_reused():
    keys = [(t.i, t.j) for t in tiles(10, 7, 3, 3, False)]
    assert keys == sorted(keys)


def test_symmetric_plan_has_upper_triangle_only():
    p = Plan(
        n1=10,
        n2=10,
        out_dim=3,
        output="full",
        symmetric=True,
        tile=3,
        strategy="jacobian",
        dtype="float64",
    )
    assert p.grid == (4, 4)
    assert p.n_tiles == 10 == len(p.tiles())
    assert all(t.i <= t.j for t in p.tiles())


def test_plan_round_trips_through_json_and_prints_its_figures():
    cost = CostModel((1e3, 2e3, 2e3, 5e2), (0, 800, 800, 8), 4, 8, 24)
    p = make_plan(
        n1=1000,
        n2=300,
        out_dim=2,
        output="full",
        symmetric=False,
        dtype="float64",
        strategy="structured",
        cost=cost,
        tile=128,
        workers=2,
        flop_rate=1e9,
    )
    again = Plan.from_json(p.to_json())
    assert again == p
    text = str(p)
    for word in (
        "tiles to compute",
        "bytes on disk",
        "peak memory/worker",
        "FLOPs",
        "estimated time",
    ):
        assert word in text
    assert p.bytes_on_disk == 1000 * 300 * 4 * 8
    # Ragged blocks are padded: every tile costs a full tile; no factors
    # were described, so nothing is cached.
    assert p.cache == "none"
    assert p.total_flops == pytest.approx(p.n_tiles * cost.tile_flops(128, 128))
    assert p.est_seconds == pytest.approx(
        p.total_flops / 1e9 / 2 + p.bytes_on_disk / 1e9
    )
    one_cpu = dataclasses.replace(p, parallel=1)
    assert one_cpu.est_seconds == pytest.approx(
        p.total_flops / 1e9 + p.bytes_on_disk / 1e9
    )


def test_cost_model_fit_is_exact_for_bilinear_costs():
    f = lambda a, b: 7.0 + 3.0 * a + 5.0 * b + 2.0 * a * b
    samples = {(a, b): (f(a, b), 2 * f(a, b)) for a in (16, 32) for b in (16, 32)}
    m = CostModel.fit(samples, out_items=1, itemsize=8, feature_bytes=8)
    assert m.tile_flops(100, 3) == pytest.approx(f(100, 3))
    assert m.strategy_bytes(5, 9) == pytest.approx(2 * f(5, 9))


@settings(max_examples=40, deadline=None)
@given(
    per_pair=st.integers(8, 10_000),
    per_side=st.integers(0, 100_000),
    extra=st.integers(1, 2**30),
)
def test_largest_tile_is_the_largest_that_fits(per_pair, per_side, extra):
    m = CostModel((0, 0, 0, 0), (0, per_side, per_side, per_pair), 1, 8, 8)
    budget = WORKER_BASELINE_BYTES + extra
    if m.worker_bytes(1, 1) > budget:
        with pytest.raises(PlanError):
            largest_tile_within(budget, m, 5000)
        return
    t = largest_tile_within(budget, m, 5000)
    assert m.worker_bytes(t, t) <= budget
    assert t == 5000 or m.worker_bytes(t + 1, t + 1) > budget


def test_too_small_budget_says_how_much_is_needed():
    m = CostModel((0, 0, 0, 0), (0, 1e6, 1e6, 0), 4, 8, 8)
    with pytest.raises(PlanError, match=r"needs at least .*MiB") as info:
        make_plan(
            n1=10,
            n2=10,
            out_dim=2,
            output="full",
            symmetric=True,
            dtype="float64",
            strategy="jacobian",
            cost=m,
            memory_budget=2**20,
        )
    assert format_bytes(m.worker_bytes(1, 1)) in str(info.value)


def test_explicit_tile_over_budget_is_refused_with_the_largest_that_fits():
    m = CostModel((0, 0, 0, 0), (0, 0, 0, 8 * 2**10), 1, 8, 8)
    budget = WORKER_BASELINE_BYTES + 2 * 100 * 100 * 8 * 2**10
    with pytest.raises(PlanError, match="largest tile that fits is"):
        make_plan(
            n1=1000,
            n2=1000,
            out_dim=1,
            output="trace",
            symmetric=True,
            dtype="float64",
            strategy="jacobian",
            cost=m,
            tile=500,
            memory_budget=budget,
        )


def test_default_tile_gives_each_worker_tiles():
    m = CostModel((0, 0, 0, 1), (0, 8, 8, 8), 1, 8, 8)
    p = make_plan(
        n1=2000,
        n2=2000,
        out_dim=1,
        output="trace",
        symmetric=True,
        dtype="float64",
        strategy="jacobian",
        cost=m,
        workers=4,
    )
    assert p.n_tiles >= 8
    assert p.tile <= 1024


def _big_tiles_model():
    """A cost model whose worker bytes grow with the tile: 1 MiB per sample pair."""
    return CostModel((0, 1e6, 1e6, 1e6), (0, 2**20, 2**20, 2**20), 1, 4, 64)


def test_without_a_budget_tiles_fit_the_machine_limit():
    """No budget given: tiles are sized within the memory limit, and the plan
    says so; an explicit tile is checked against it; a budget replaces it."""
    m = _big_tiles_model()
    common = {
        "n1": 4096,
        "n2": 4096,
        "out_dim": 1,
        "output": "trace",
        "symmetric": True,
        "dtype": "float32",
        "strategy": "structured",
        "cost": m,
    }
    limit = 4 * 2**30
    free = make_plan(**common)
    fitted = make_plan(**common, memory_limit=limit)
    assert m.worker_bytes(free.tile, free.tile) > limit  # the limit matters here
    assert fitted.tile < free.tile
    assert fitted.peak_bytes_per_worker <= limit
    assert fitted.memory_limit == limit and free.memory_limit is None
    assert "this machine's memory per worker" in str(fitted)
    assert Plan.from_json(fitted.to_json()) == fitted
    budgeted = make_plan(**common, memory_budget=2 * 2**30, memory_limit=limit)
    assert budgeted.memory_limit is None and budgeted.memory_budget == 2 * 2**30
    explicit = make_plan(**common, tile=fitted.tile, memory_limit=limit)
    assert explicit.tile == fitted.tile and explicit.memory_limit == limit
    # a given tile the machine cannot hold is refused (it was killed for memory)
    with pytest.raises(PlanError) as info:
        make_plan(**common, tile=512, memory_limit=limit)
    need = format_bytes(m.worker_bytes(512, 512))
    assert f"tile=512 needs {need} per worker, more than the 4.0 GiB" in str(info.value)
    assert f"the largest tile that fits is {fitted.tile}" in str(info.value)
    assert make_plan(**common, tile=512, memory_limit=limit, memory_budget=2**50).tile
    # a limit that cannot hold even one sample is ignored, not turned into an error
    tiny = make_plan(**common, memory_limit=1.0)
    assert tiny.tile == free.tile


def test_auto_cache_never_picks_a_factor_store_larger_than_the_disk():
    m = CostModel((0, 1e9, 1e9, 1e3), (0, 8, 8, 8), 1, 4, 64)
    common = {
        "n1": 20000,
        "n2": 20000,
        "out_dim": 1,
        "output": "trace",
        "symmetric": True,
        "dtype": "float32",
        "strategy": "structured",
        "cost": m,
        "tile": 1000,
        "factor_bytes_per_sample": 1e6,
        "cache_budget": 0.0,
    }
    roomy = make_plan(**common)
    assert roomy.cache == "store"  # factors are dear to recompute: kept on disk
    assert roomy.factor_bytes > 1e9
    cramped = make_plan(**common, disk_limit=1e9)
    assert cramped.cache != "store"
    assert make_plan(**common, cache="store", disk_limit=1e9).cache == "store"


def test_a_resnet_plan_without_a_budget_fits_this_machine():
    """The CIFAR ResNet-18's trace kernel: without a budget its tile used to be
    sized for no limit at all (683 samples, 292 GiB per worker)."""
    import os

    import ntkdist
    from ntkdist._bench._models import REAL_CASES
    from ntkdist._planning import MEMORY_FRACTION, worker_memory

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert worker_memory(2) <= MEMORY_FRACTION * total / 2 + 1
    fn, params, shape = REAL_CASES["resnet18-cifar"]()
    x = np.zeros((2048, *shape), np.float32)
    p = ntkdist.plan(fn, params, x, output="trace", workers=2, probe=False)
    assert p.memory_budget is None and p.memory_limit == worker_memory(2)
    assert p.peak_bytes_per_worker <= p.memory_limit
    assert p.tile < 683


def test_a_given_resnet_tile_gets_rules_that_fit_this_machine(monkeypatch):
    """A ResNet-18 ``trace`` tile of 64 given by hand: the default rules (for
    256-sample tiles) keep per-weight Jacobian rows, 29.5 GiB per worker
    predicted, and the run was killed for memory. The plan now takes the
    rules for smaller tiles until the tile fits, or refuses. (A worker's
    memory is set to this 24 GiB machine's 9.4 GiB for two workers, so that
    the test means the same on a larger one.)"""
    import ntkdist
    from ntkdist import _planning
    from ntkdist._bench._models import REAL_CASES
    from ntkdist.kernels import StructuredDerivatives

    limit = 9.4 * 2**30
    monkeypatch.setattr(_planning, "worker_memory", lambda workers: limit)
    fn, params, shape = REAL_CASES["resnet18-cifar"]()
    x = np.zeros((128, *shape), np.float32)
    kw = {"output": "trace", "tile": 64, "workers": 2, "probe": False}
    p = ntkdist.plan(fn, params, x, strategy="structured", **kw)
    assert p.tile == 64 and p.memory_limit == limit
    assert p.peak_bytes_per_worker <= limit
    assert "nominal_tile=256" not in p.strategy_repr
    default = StructuredDerivatives()
    unfit = ntkdist.plan(fn, params, x, strategy=default, memory_budget=2**50, **kw)
    assert unfit.peak_bytes_per_worker > limit  # the default rules'


def test_a_factor_cache_is_counted_beside_the_tile_not_twice():
    """A worker's factor cache holds the tile's own two blocks, which the
    tile's figure counts already; a cache smaller than one block holds none."""
    m = CostModel((0, 0, 0, 1), (0, 8, 8, 0), 1, 8, 8)
    common = {"out_dim": 1, "output": "trace", "symmetric": True, "dtype": "float64"}
    common.update(strategy="jacobian", cost=m, tile=50, cache="memory")
    per = 1e6  # factor bytes per sample
    worker = m.worker_bytes(50, 50)
    p = make_plan(n1=100, n2=100, factor_bytes_per_sample=per, **common)
    assert p.peak_bytes_per_worker == worker  # both blocks are the tile's
    p = make_plan(n1=400, n2=400, factor_bytes_per_sample=per, **common)
    assert p.peak_bytes_per_worker == worker + 400 * per - 100 * per
    p = make_plan(
        n1=400, n2=400, factor_bytes_per_sample=per, cache_budget=4e7, **common
    )
    assert p.peak_bytes_per_worker == worker  # a block (5e7) exceeds the cache


def _wide(p, x):
    """Small weights around two wide constant layers: a backward pass holds
    ``O`` times ``[n, 65536]`` deltas, the factors a few numbers a sample."""
    rng = np.random.default_rng(0)
    c1 = rng.standard_normal((8, 1 << 16)).astype(np.float32) / 3
    c2 = rng.standard_normal((1 << 16, 8)).astype(np.float32) / 256
    return (jnp.tanh(jnp.tanh(x @ p["w1"]) @ c1) @ c2) @ p["w2"]


def _wide_job(seed, n):
    """Parameters of ``_wide`` and ``n`` inputs."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.standard_normal((8, 8)).astype(np.float32),
        "w2": rng.standard_normal((8, 10)).astype(np.float32),
    }
    return params, rng.standard_normal((n, 8)).astype(np.float32)


def test_a_tile_is_sized_on_what_its_programs_compile_to(monkeypatch):
    """The cost model counts a strategy's factors, not the deltas a backward
    pass holds on the way: for ``_wide`` it fits tiles of 1024 in 2 GiB,
    whose programs XLA assigns 2.8 GiB. A probed plan compiles the tile's
    programs (without running them), shrinks a sized tile until they fit,
    records their figure, and refuses a given tile they do not fit."""
    import ntkdist
    from ntkdist import _planning
    from ntkdist._planner._budget import XLA_HEADROOM

    params, x = _wide_job(1, 4096)
    budget = 2 * 2**30
    seen = []

    real = _planning.compiled_bytes

    def spy(job, rows, cols):
        seen.append((rows, cols, real(job, rows, cols)))
        return seen[-1][2]

    monkeypatch.setattr(_planning, "compiled_bytes", spy)
    kw = {"output": "trace", "memory_budget": budget, "strategy": "structured"}
    estimated = ntkdist.plan(_wide, params, x, probe=False, **kw)
    assert estimated.compiled_bytes is None and not seen
    assert "estimated" in str(estimated)
    probed = ntkdist.plan(_wide, params, x, **kw)
    first, last = seen[0], seen[-1]
    assert first[:2] == (estimated.tile, estimated.tile)
    assert WORKER_BASELINE_BYTES + XLA_HEADROOM * first[2] > budget  # did not fit
    assert probed.tile < estimated.tile and last[:2] == (probed.tile, probed.tile)
    assert probed.compiled_bytes == last[2]
    assert (
        WORKER_BASELINE_BYTES + XLA_HEADROOM * last[2] <= probed.peak_bytes_per_worker
    )
    assert probed.peak_bytes_per_worker <= budget
    assert format_bytes(probed.compiled_bytes) in str(probed)
    # Both blocks' factors are among the buffers (float32, exact sizes).
    factors = probed.factor_bytes / x.shape[0] * 2 * probed.tile
    assert probed.compiled_bytes >= factors
    assert ntkdist.plan(_wide, params, x, tile=1024, probe=False, **kw).tile == 1024
    with pytest.raises(
        PlanError, match=r"tile=1024 needs .* the largest tile that fits is \d+"
    ):
        ntkdist.plan(_wide, params, x, tile=1024, **kw)


def test_auto_holds_a_single_tile_to_its_budget_as_compiled():
    """``ntk``'s ``auto`` with a budget checks each candidate's compiled tile
    program: for ``_wide`` the cost model's bytes fit 64 MiB, but every
    strategy's program holds the backward pass's wide deltas."""
    import ntkdist
    from ntkdist._model import Model
    from ntkdist.kernels._choose import rank

    params, x = _wide_job(2, 256)
    budget = 64 * 2**20
    fitting, _, _ = rank(
        Model(_wide), params, jnp.asarray(x), 256, 256, "trace", budget
    )
    assert "structured" in fitting  # what the model alone would have run
    with pytest.raises(PlanError, match=r"structured needs .* as XLA compiles its"):
        ntkdist.ntk(_wide, params, x, output="trace", memory_budget=budget)
    roomy = ntkdist.ntk(_wide, params, x, output="trace", memory_budget="4GiB")
    plain = ntkdist.ntk(_wide, params, x, output="trace")
    np.testing.assert_allclose(roomy, plain, rtol=1e-6)


def test_a_given_tile_takes_the_richest_rules_its_compiled_programs_fit():
    """A narrow ResNet-18 ``trace`` tile of 64 in 2.1 GiB: the estimate fits
    only the rules of 4-sample tiles (the default ones, 2.19 GiB); compiled,
    the tile's own rules fit (1.35 GiB of buffers), with a third fewer FLOPs."""
    import ntkdist
    from ntkdist._bench._models import REAL_CASES

    fn, params, shape = REAL_CASES["resnet18-cifar-w16"]()
    x = np.random.default_rng(5).standard_normal((128, *shape)).astype(np.float32)
    budget = 2.1 * 2**30
    kw = {"output": "trace", "tile": 64, "workers": 1, "memory_budget": budget}
    estimated = ntkdist.plan(fn, params, x, probe=False, **kw)
    assert "nominal_tile=4," in estimated.strategy_repr
    probed = ntkdist.plan(fn, params, x, **kw)
    assert "nominal_tile=64," in probed.strategy_repr
    assert probed.tile == 64 and probed.compiled_bytes is not None
    assert probed.peak_bytes_per_worker <= budget
    assert probed.total_flops < 0.8 * estimated.total_flops
    # Rules the user chose are kept as they are.
    from ntkdist.kernels import StructuredDerivatives

    own = StructuredDerivatives(nominal_tile=4)
    assert ntkdist.plan(fn, params, x, strategy=own, **kw).strategy_repr == repr(own)
