"""Factor reuse across tiles: every cache level gives the same kernel, each
block is factored once, the factor store is checked and survives, and the
planner's choices (cache level, auto strategy) follow its predictions."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import zarr
from distributed import Client

import ntkdist
import ntkdist.testing
from ntkdist._api import repair
from ntkdist._job import prepare, with_strategy
from ntkdist._planner import CostModel, make_plan
from ntkdist._planner._plan import DEFAULT_FLOP_RATE, READ_RATE
from ntkdist._planning import plan_job
from ntkdist.executors import JaxWorkerPlugin
from ntkdist.executors._factors import CACHE
from ntkdist.kernels import STRATEGIES, get

from . import engine
from .engine import mlp

OUTPUTS = ["full", "trace", "diagonal", "pntk"]


def make_params(seed=0, d=4, width=12, o=3):
    return engine.make_params(seed, d, width, o, out_scale=3)


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return make_params(), rng.normal(size=(10, 4)), rng.normal(size=(7, 4))


def _compute(tmp_path, name, p, x1, x2, **kw):
    CACHE.clear()
    kw = {
        "tile": 3,
        "executor": "serial",
        "progress": False,
        "strategy": "structured",
        **kw,
    }
    return ntkdist.compute(mlp, p, x1, x2, store=tmp_path / name, **kw)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_cache_level_gives_the_same_bytes(tmp_path, data, output, symmetric):
    p, x1, x2 = data
    x2 = None if symmetric else x2
    kernels = {}
    for level in ("none", "memory", "store"):
        s = _compute(tmp_path, f"{level}.zarr", p, x1, x2, output=output, cache=level)
        assert s.plan.cache == level
        kernels[level] = s.kernel[...]
    ref = ntkdist.ntk(mlp, p, x1, x2, output=output)
    np.testing.assert_allclose(kernels["none"], ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(kernels["memory"], kernels["none"])
    np.testing.assert_array_equal(kernels["store"], kernels["none"])


def test_each_block_is_factored_once(tmp_path, data):
    p, x1, x2 = data  # 10 samples in tiles of 3: 4 blocks; x2: 3 blocks
    _compute(tmp_path, "sym.zarr", p, x1, None, output="full", cache="memory")
    assert CACHE.computed == 4
    _compute(tmp_path, "rect.zarr", p, x1, x2, output="full", cache="memory")
    assert CACHE.computed == 4 + 3
    # Without reuse: 4 diagonal tiles make one pass, 6 others make two.
    _compute(tmp_path, "none.zarr", p, x1, None, output="full", cache="none")
    assert CACHE.computed == 4 + 2 * 6


def test_cache_evicts_least_recently_used_within_its_bytes():
    from ntkdist.executors._factors import FactorCache

    c = FactorCache()
    c.put(("a",), "A", 40, limit=100)
    c.put(("b",), "B", 40, limit=100)
    assert c.get(("a",)) == "A"  # now b is the least recently used
    c.put(("c",), "C", 40, limit=100)
    assert c.get(("b",)) is None and c.get(("a",)) == "A" and c.get(("c",)) == "C"
    assert c.nbytes == 80
    c.put(("d",), "D", 101, limit=100)  # larger than the whole cache: not kept
    assert c.get(("d",)) is None and c.nbytes == 80


def test_factor_store_is_checked_and_reused_by_repair(tmp_path, data):
    p, x1, _ = data
    s = _compute(tmp_path, "k.zarr", p, x1, None, output="full", cache="store")
    done = zarr.open_array(store=str(s.path), path="factors/x1_done", mode="r")[...]
    assert done.shape == (4,) and np.all(done != 0)
    good = s.kernel[...]
    # Damage tile (0, 1) of the kernel and block 0 of the factor store.
    os.remove(os.path.join(s.path, "kernel", "c", "0", "1", "0", "0"))
    chunk = os.path.join(s.path, "factors", "x1", "c", "0", "0")
    with open(chunk, "rb") as fh:
        raw = bytearray(fh.read())
    raw[8] ^= 0xFF
    with open(chunk, "wb") as fh:
        fh.write(bytes(raw))
    CACHE.clear()
    holes, corrupt = repair(s.path, mlp, p, executor="serial", progress=False)
    assert [t.key for t in holes + corrupt] == ["0.1"]
    # Block 1 came back from the store; block 0 failed its checksum and was
    # computed again (and rewritten).
    assert CACHE.loaded == 1 and CACHE.computed == 1
    np.testing.assert_array_equal(ntkdist.open(s.path).kernel[...], good)
    done = zarr.open_array(store=str(s.path), path="factors/x1_done", mode="r")[...]
    flat = zarr.open_array(store=str(s.path), path="factors/x1", mode="r")[0]
    from ntkdist.storage import checksum

    assert int(done[0]) == checksum(np.asarray(flat))


# -- on worker processes -------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with engine.two_worker_cluster() as c:
        yield c


@pytest.mark.cluster
@pytest.mark.parametrize("level", ["memory", "store"])
def test_cluster_reuse_equals_ntk(tmp_path, cluster, data, level):
    p, x1, x2 = data
    with Client(cluster) as client:
        client.register_plugin(JaxWorkerPlugin(x64=True))
        client.run(_clear)
        for name, y in (("sym", None), ("rect", x2)):
            s = ntkdist.compute(
                mlp,
                p,
                x1,
                y,
                store=tmp_path / f"{name}.zarr",
                output="full",
                tile=3,
                cache=level,
                strategy="structured",
                client=client,
                progress=False,
            )
            ref = ntkdist.ntk(mlp, p, x1, y, output="full")
            np.testing.assert_allclose(s.kernel[...], ref, rtol=1e-10, atol=1e-13)
            assert s.check_tiles() == ([], [])
        passes = client.run(_stats)
    # Two jobs of 4 (+ 3) blocks: every worker computed each block at most
    # once; the finished jobs' factors were freed on every worker.
    assert 0 < sum(c for c, _ in passes.values()) <= 2 * (4 + 4 + 3)
    assert all(held == 0 for _, held in passes.values())


def _clear():
    from ntkdist.executors._factors import CACHE

    CACHE.clear()


def _stats():
    from ntkdist.executors._factors import CACHE

    return CACHE.computed, CACHE.nbytes


# -- the planner -------------------------------------------------------------


def _cost(a=1e6, d=1e4):
    return CostModel((0.0, a, a, d), (0.0, 1e3, 1e3, 8.0), 1, 4, 16)


def _plan(**kw):
    args = {
        "n1": 4096,
        "n2": 4096,
        "out_dim": 1,
        "output": "trace",
        "symmetric": True,
        "dtype": "float32",
        "strategy": "structured",
        "cost": _cost(),
        "tile": 256,
        "workers": 2,
        "factor_bytes_per_sample": 4e3,
    }
    return make_plan(**{**args, **kw})


def test_planner_keeps_factors_in_memory_when_they_fit():
    p = _plan()
    assert p.cache == "memory"
    assert p.factor_bytes == 4096 * 4e3
    # 136 tiles' contractions, and 16 blocks factored at most once per worker
    # (rather than twice per tile, once per diagonal tile).
    a, d = 1e6, 1e4
    contract = 136 * d * 256 * 256
    assert p.total_flops == pytest.approx(contract + 2 * 16 * a * 256)
    assert p.flops_no_reuse == pytest.approx(contract + (2 * 136 - 16) * a * 256)
    assert "factors" in str(p) and "recomputing factors per tile" in str(p)


def test_planner_uses_a_store_when_memory_cannot_hold_and_passes_are_costly():
    p = _plan(cache_budget=3 * 256 * 4e3)  # three blocks of sixteen
    assert p.cache == "store"
    assert p.read_bytes > 0
    # Cheap factor passes: recomputing beats reading them back.
    q = _plan(cost=_cost(a=10.0), cache_budget=3 * 256 * 4e3)
    assert q.cache in ("memory", "none")


def test_planner_skips_caching_free_factors():
    assert _plan(factor_bytes_per_sample=0.0).cache == "none"
    assert _plan(cost=_cost(a=0.0)).cache == "none"


def test_plan_estimates_include_factor_store_reads():
    p = _plan(cache="store", cache_budget=3 * 256 * 4e3, flop_rate=1e10)
    # FLOPs over two workers' devices; factor I/O and the kernel's write after.
    assert p.est_seconds == pytest.approx(
        p.total_flops / 1e10 / 2 + p.read_bytes / READ_RATE + p.bytes_on_disk / 1e9
    )
    # Factor passes at their own measured rate, contractions at theirs.
    q = _plan(cache="memory", flop_rate=1e10)
    contract = 136 * 1e4 * 256 * 256
    assert q.factor_flops > 0
    assert q.factor_flops == pytest.approx(q.total_flops - contract)
    q2 = dataclasses.replace(q, factor_rate=1e9)
    assert q2.est_seconds == pytest.approx(
        (contract / 1e10 + q.factor_flops / 1e9) / 2 + q.bytes_on_disk / 1e9
    )


def test_auto_picks_the_strategy_with_the_smallest_predicted_job_time():
    rng = np.random.default_rng(0)
    p = make_params(d=8, width=64, o=4)
    x = rng.normal(size=(512, 8))
    job = prepare(mlp, p, x, None, output="full", strategy="auto")
    chosen, plan = plan_job(job, tile=128, workers=2, probe=False)
    seconds = {}
    for name in STRATEGIES:
        _, q = plan_job(with_strategy(job, get(name)), tile=128, workers=2, probe=False)
        seconds[name] = q.total_flops / DEFAULT_FLOP_RATE + q.read_bytes / READ_RATE
    best = min(seconds.values())
    assert plan.strategy == chosen.strategy.name
    assert seconds[plan.strategy] <= best * (1 + 1e-9)
    # The job carries the chosen strategy, and its fingerprint field follows.
    assert (
        chosen.fields["strategy"]
        == with_strategy(job, chosen.strategy).fields["strategy"]
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_rate_probe_compiles_the_programs_the_tiles_run(
    data, symmetric, monkeypatch
):
    """A cheap tile is probed at its own shape, even above the probe's usual
    side, so its first tile compiles nothing (JAX reports each backend
    compilation); a costly one is probed at that side."""
    import jax

    from ntkdist import _planning
    from ntkdist._planning import cost_model, probe_sides
    from ntkdist.kernels._jit import contract_fn, factors_fn

    monkeypatch.setattr(_planning, "RATE_PROBE", 2)
    p, x1, x2 = data
    x2 = None if symmetric else x2
    # A model of its own: nothing compiled by an earlier test is reused.
    job = prepare(
        lambda q, x: mlp(q, x), p, x1, x2, output="full", strategy="structured"
    )
    job, plan = plan_job(job, tile=4, probe=False)
    cost = cost_model(job)
    assert probe_sides(plan, cost) == (plan.tile_rows, plan.tile_cols)
    with monkeypatch.context() as costly:
        costly.setattr(_planning, "PROBE_FLOPS", 0.0)
        assert probe_sides(plan, cost) == (2, 2)
    compiled: list[str] = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _, probed = plan_job(job, tile=4, probe=True)
        assert probed.flop_rate > 0 and compiled
        compiled.clear()
        a = (job.strategy, job.model, job.output, job.params)
        f1 = factors_fn(*a, jax.numpy.asarray(x1[4:8]))
        f2 = factors_fn(*a, jax.numpy.asarray((x1 if x2 is None else x2)[:4]))
        jax.block_until_ready(contract_fn(*a, f1, f2))
        assert not compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_jacobian_rows_are_reused_too(tmp_path, data):
    p, x1, _ = data
    none = _compute(
        tmp_path,
        "n.zarr",
        p,
        x1,
        None,
        output="full",
        cache="none",
        strategy="jacobian",
    )
    assert CACHE.computed == 4 + 2 * 6
    mem = _compute(
        tmp_path,
        "m.zarr",
        p,
        x1,
        None,
        output="full",
        cache="memory",
        strategy="jacobian",
    )
    assert mem.plan.strategy == "jacobian" and CACHE.computed == 4
    np.testing.assert_array_equal(mem.kernel[...], none.kernel[...])
    ref = ntkdist.testing.reference_ntk(mlp, p, x1, None, output="full")
    np.testing.assert_allclose(mem.kernel[...], ref, rtol=1e-10, atol=1e-13)
