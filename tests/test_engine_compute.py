"""compute() equals ntk() through the store, serially and on Dask clusters."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

import ntkdist
from ntkdist import InputError, ModelError, PlanError, StoreError
from ntkdist.executors import JaxWorkerPlugin

from .engine import make_params, mlp, two_worker_cluster

OUTPUTS = ["full", "trace", "diagonal", "pntk"]


def coupled(p, x):
    """Couples samples through the batch mean: not a per-sample model."""
    return (x - x.mean(axis=0)) @ p["w"]


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return make_params(), rng.normal(size=(11, 4)), rng.normal(size=(7, 4))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_serial_compute_equals_ntk(tmp_path, data, output, symmetric):
    p, x1, x2 = data
    x2 = None if symmetric else x2
    s = ntkdist.compute(
        mlp,
        p,
        x1,
        x2,
        store=tmp_path / "k.zarr",
        output=output,
        tile=4,
        executor="serial",
        progress=False,
    )
    ref = ntkdist.ntk(mlp, p, x1, x2, output=output)
    assert s.kernel.shape == ref.shape and s.kernel.dtype == np.float64
    np.testing.assert_allclose(s.kernel[...], ref, rtol=1e-10, atol=1e-13)
    assert s.complete and s.progress() == (s.plan.n_tiles, s.plan.n_tiles)
    assert s.kernel.chunks[:2] == (4, 4)  # ragged: 11 = 4 + 4 + 3
    assert (s.output, s.out_dim, s.n1, s.n2, s.symmetric) == (
        output,
        3,
        11,
        11 if symmetric else 7,
        symmetric,
    )
    if symmetric:
        k = s.kernel[...]
        axes = {"full": (1, 0, 3, 2), "diagonal": (1, 0, 2)}.get(output, (1, 0))
        np.testing.assert_array_equal(k, k.transpose(axes))


def test_open_exposes_the_contract(tmp_path, data):
    p, x1, _ = data
    ntkdist.compute(
        mlp,
        p,
        x1,
        store=tmp_path / "k.zarr",
        output="trace",
        tile=5,
        executor="serial",
        progress=False,
        strategy="jacobian",
    )
    s = ntkdist.open(tmp_path / "k.zarr")
    assert isinstance(s.kernel, zarr.Array) and s.kernel.shape == (11, 11)
    for f in ("model", "params", "x1", "x2", "output", "strategy", "dtype", "tile"):
        assert isinstance(s.fields[f], str) and s.fields[f]
    assert s.attrs["output"] == "trace" and s.attrs["strategy"] == "jacobian"
    assert s.fingerprint == s.attrs["fingerprint"]
    np.testing.assert_array_equal(s.to_dask().compute(), s.kernel[...])
    assert s.to_dask().chunks[0] == (5, 5, 1)
    with pytest.raises(Exception, match=r"read.only|ReadOnly"):
        s.kernel[0, 0] = 1.0


def test_zarr_and_dask_inputs_are_read_in_tiles(tmp_path, data):
    p, x1, x2 = data
    z = zarr.create_array(
        store=str(tmp_path / "x1.zarr"), shape=x1.shape, chunks=(3, 4), dtype="float64"
    )
    z[...] = x1
    s = ntkdist.compute(
        mlp,
        p,
        zarr.open_array(str(tmp_path / "x1.zarr"), mode="r"),
        da.from_array(x2, chunks=3),
        store=tmp_path / "k.zarr",
        output="diagonal",
        tile=4,
        executor="serial",
        progress=False,
    )
    np.testing.assert_allclose(
        s.kernel[...], ntkdist.ntk(mlp, p, x1, x2, output="diagonal"), rtol=1e-10
    )
    # The zarr input is read in place; the dask one is copied into the store.
    assert s.attrs["inputs"]["x1"]["root"] == str(tmp_path / "x1.zarr")
    assert s.attrs["inputs"]["x2"]["path"] == "inputs/x2"


def test_in_process_local_cluster(tmp_path, data):
    p, x1, x2 = data
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        s = ntkdist.compute(
            mlp,
            p,
            x1,
            x2,
            store=tmp_path / "k.zarr",
            output="full",
            tile=3,
            client=client,
            progress=False,
        )
        assert (
            "ntkdist-jax"
            in client.run(lambda dask_worker: list(dask_worker.plugins))[
                next(iter(client.nthreads()))
            ]
        )
    np.testing.assert_allclose(
        s.kernel[...], ntkdist.ntk(mlp, p, x1, x2), rtol=1e-10, atol=1e-13
    )


def test_rerun_of_a_finished_job_computes_nothing(tmp_path, data, capsys):
    p, x1, _ = data
    kw = {
        "store": tmp_path / "k.zarr",
        "output": "pntk",
        "tile": 4,
        "executor": "serial",
    }
    ntkdist.compute(mlp, p, x1, **kw)
    before = (tmp_path / "k.zarr" / "done").stat().st_mtime_ns
    ntkdist.compute(mlp, p, x1, **kw)
    err = capsys.readouterr().err
    assert "6/6 tiles done, nothing to compute" in err
    assert (tmp_path / "k.zarr" / "done").stat().st_mtime_ns == before


# -- bad input: a clear error, and nothing written before is lost -------------


def test_mismatched_input_shapes(tmp_path, data):
    p, x1, _ = data
    with pytest.raises(InputError, match=r"x1 has samples of shape \(4,\) but x2"):
        ntkdist.compute(
            mlp, p, x1, np.ones((3, 5)), store=tmp_path / "k.zarr", executor="serial"
        )
    assert not (tmp_path / "k.zarr").exists()


def test_model_that_couples_samples_is_refused(tmp_path):
    with pytest.raises(ModelError, match="depends on the other samples"):
        ntkdist.compute(
            coupled,
            {"w": np.ones((2, 2))},
            np.random.rand(6, 2),
            store=tmp_path / "k.zarr",
            executor="serial",
        )


def test_budget_too_small_for_one_tile_says_what_is_needed(tmp_path, data):
    p, x1, _ = data
    with pytest.raises(PlanError, match=r"needs at least [0-9.]+ MiB"):
        ntkdist.compute(
            mlp,
            p,
            x1,
            store=tmp_path / "k.zarr",
            memory_budget="1MiB",
            executor="serial",
        )
    assert not (tmp_path / "k.zarr").exists()


def test_store_path_holding_something_else_is_untouched(tmp_path, data):
    p, x1, _ = data
    (tmp_path / "k.zarr").mkdir()
    (tmp_path / "k.zarr" / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not an ntkdist kernel store"):
            ntkdist.compute(
                mlp,
                p,
                x1,
                store=tmp_path / "k.zarr",
                tile=4,
                executor="serial",
                overwrite=overwrite,
            )
    assert (tmp_path / "k.zarr" / "notes.txt").read_text() == "precious"
    assert os.listdir(tmp_path / "k.zarr") == ["notes.txt"]


def test_read_only_store_location(tmp_path, data):
    p, x1, _ = data
    target = "/proc/ntkdist-test/k.zarr"
    with pytest.raises(StoreError, match="cannot"):
        ntkdist.compute(mlp, p, x1, store=target, tile=4, executor="serial")


def test_file_as_store_path(tmp_path, data):
    p, x1, _ = data
    (tmp_path / "k.zarr").write_text("a file")
    with pytest.raises(StoreError):
        ntkdist.compute(
            mlp, p, x1, store=tmp_path / "k.zarr", tile=4, executor="serial"
        )
    assert (tmp_path / "k.zarr").read_text() == "a file"


def test_unknown_executor(tmp_path, data):
    p, x1, _ = data
    with pytest.raises(InputError, match="executor='spark'"):
        ntkdist.compute(mlp, p, x1, store=tmp_path / "k.zarr", tile=4, executor="spark")


# -- multi-process LocalCluster (CI passes --run-cluster) ----------------------


@pytest.fixture(scope="module")
def cluster():
    with two_worker_cluster() as c:
        yield c


@pytest.mark.cluster
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_cluster_compute_equals_ntk(tmp_path, cluster, data, output, symmetric):
    p, x1, x2 = data
    x2 = None if symmetric else x2
    with Client(cluster) as client:
        client.register_plugin(JaxWorkerPlugin(x64=True))
        s = ntkdist.compute(
            mlp,
            p,
            x1,
            x2,
            store=tmp_path / "k.zarr",
            output=output,
            tile=3,
            client=client,
            progress=False,
        )
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids
    ref = ntkdist.ntk(mlp, p, x1, x2, output=output)
    np.testing.assert_allclose(s.kernel[...], ref, rtol=1e-10, atol=1e-13)
    assert s.complete and s.check_tiles() == ([], [])


@pytest.mark.cluster
def test_embedded_workers_use_huge_pages_for_malloc(monkeypatch):
    # Large tile buffers on transparent huge pages (ntkdist._hugepages): the
    # tunable must reach the worker processes, which read it when they start.
    from ntkdist.executors import DaskExecutor

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with DaskExecutor(n_workers=1, verbose=False) as ex:
        seen = ex.client.run(lambda: os.environ.get("GLIBC_TUNABLES"))
    assert list(seen.values()) == ["glibc.malloc.hugetlb=1"]


def test_compute_runs_the_plan_it_is_given(tmp_path, data):
    """What ``ntkdist.plan`` returns is what ``compute(plan=...)`` executes."""
    p, x1, _ = data
    planned = ntkdist.plan(mlp, p, x1, output="trace", tile=3, workers=1, probe=False)
    s = ntkdist.compute(
        mlp,
        p,
        x1,
        store=tmp_path / "k.zarr",
        output="trace",
        plan=planned,
        executor="serial",
        progress=False,
    )
    assert s.plan == planned
    assert s.spec.strategy == planned.strategy and s.complete
    ref = ntkdist.ntk(mlp, p, x1, output="trace")
    np.testing.assert_allclose(s.kernel[...], ref, rtol=1e-10, atol=1e-13)


def test_compute_without_a_plan_plans_as_plan_does(tmp_path, data):
    p, x1, _ = data
    planned = ntkdist.plan(
        mlp, p, x1, output="full", memory_budget="1GiB", workers=1, probe=False
    )
    s = ntkdist.compute(
        mlp,
        p,
        x1,
        store=tmp_path / "k.zarr",
        output="full",
        memory_budget="1GiB",
        executor="serial",
        progress=False,
    )
    assert s.plan == planned


def test_a_plan_for_another_job_is_refused(tmp_path, data):
    p, x1, x2 = data
    planned = ntkdist.plan(mlp, p, x1, output="trace", tile=3, probe=False)
    with pytest.raises(InputError, match="n2 is 11 in the plan but 7 here"):
        ntkdist.compute(
            mlp,
            p,
            x1,
            x2,
            store=tmp_path / "k.zarr",
            output="trace",
            plan=planned,
            executor="serial",
            progress=False,
        )
    assert not (tmp_path / "k.zarr").exists()


def test_models_with_one_jaxpr_over_differently_structured_params(tmp_path):
    """``tanh(x @ p)`` and ``tanh(x @ p["w"])`` trace to one jaxpr over their
    leaves; computed one after the other in one process, each runs its own
    function (the compiled-model cache keys on the params' structure too)."""
    import jax.numpy as jnp

    def f_array(p, x):
        return jnp.tanh(x @ p)

    def f_dict(p, x):
        return jnp.tanh(x @ p["w"])

    w = np.random.default_rng(0).normal(size=(3, 2))
    x = np.random.default_rng(1).normal(size=(8, 3))
    kw = {"output": "trace", "tile": 4, "executor": "serial", "progress": False}
    a = ntkdist.compute(f_dict, {"w": w}, x, store=tmp_path / "a.zarr", **kw)
    b = ntkdist.compute(f_array, w, x, store=tmp_path / "b.zarr", **kw)
    np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
