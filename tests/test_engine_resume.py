"""Resume: failed tiles, fingerprint mismatches, the lock, and killed processes."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed import Client

import ntkdist
from ntkdist import ExecutionError, ResumeMismatchError, StoreLockedError
from ntkdist._cli import load_model
from ntkdist.kernels import AbstractKernelStrategy, JacobianContraction
from ntkdist.storage import StoreLock

from .engine import two_worker_cluster


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"]


def make_params(seed=0, d=3, width=16, o=2):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(d, width)),
        "b1": rng.normal(size=width),
        "w2": rng.normal(size=(width, o)) / 4,
    }


def _fail_if_flagged(flag: str, x: np.ndarray) -> np.ndarray:
    if os.path.exists(flag):
        with open(flag) as f:
            bad = float(f.read())
        if np.any(np.asarray(x) == bad):
            raise RuntimeError(f"injected failure on the block holding {bad}")
    return np.zeros((), np.asarray(x).dtype)


@dataclasses.dataclass(frozen=True)
class FailingJacobian(AbstractKernelStrategy):
    """Jacobian contraction that fails on blocks holding a flagged value."""

    name: ClassVar[str] = "jacobian"
    flag: str

    def factors(self, model, params, x, output):
        z = jax.pure_callback(
            lambda v: _fail_if_flagged(self.flag, v),
            jax.ShapeDtypeStruct((), x.dtype),
            x,
        )
        return [g + z for g in JacobianContraction().factors(model, params, x, output)]

    def contract(self, model, params, f1, f2, output):
        return JacobianContraction().contract(model, params, f1, f2, output)

    def cost(self, model, params, x, n1, n2, output):
        return JacobianContraction().cost(model, params, x, n1, n2, output)


def test_failed_tiles_are_reported_and_a_rerun_computes_only_those(tmp_path):
    p, x = make_params(), np.random.default_rng(1).normal(size=(10, 3))
    flag = tmp_path / "fail"
    flag.write_text(repr(float(x[5, 0])))  # sample 5: block 1 with tile 3
    strategy = FailingJacobian(str(flag))
    kw = {
        "store": tmp_path / "k.zarr",
        "output": "full",
        "tile": 3,
        "strategy": strategy,
        "executor": "serial",
        "progress": False,
    }
    with pytest.raises(ExecutionError, match="4 of 10 tiles failed") as info:
        ntkdist.compute(mlp, p, x, **kw)
    assert "injected failure" in str(info.value)
    s = ntkdist.open(tmp_path / "k.zarr")
    missing = sorted(t.key for t in s.todo())
    assert missing == ["0.1", "1.1", "1.2", "1.3"]  # every tile touching block 1
    done_before = {t.key: int(s.done[t.i, t.j]) for t in s.done_tiles()}
    flag.unlink()
    s = ntkdist.compute(mlp, p, x, **kw)
    assert s.complete
    assert {
        t.key: int(s.done[t.i, t.j]) for t in s.done_tiles() if t.key in done_before
    } == done_before
    np.testing.assert_allclose(s.kernel[...], ntkdist.ntk(mlp, p, x), rtol=1e-10)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"params": make_params(seed=9)}, "params"),  # other parameter values
        ({"output": "trace"}, "output"),  # other output form
        ({"tile": 4}, "tile"),  # other tile plan
        ({"strategy": "ntvp"}, "strategy"),  # other strategy
        ({"x": np.ones((10, 3))}, "x1"),  # other inputs
        ({"x2": np.ones((4, 3))}, "x2"),  # rectangular instead of symmetric
        (
            {"apply_fn": lambda p, x: jnp.sin(x @ p["w1"] + p["b1"]) @ p["w2"]},
            "model",
        ),  # other model
        (
            {"x": np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)},
            "x1",
        ),  # other dtype of the same values
    ],
)
def test_fingerprint_mismatch_is_refused_naming_the_field(tmp_path, change, field):
    base = {
        "apply_fn": mlp,
        "params": make_params(),
        "x": np.random.default_rng(1).normal(size=(10, 3)),
        "x2": None,
        "output": "full",
        "tile": 3,
        "strategy": "jacobian",
    }

    def run(args, **kw):
        return ntkdist.compute(
            args["apply_fn"],
            args["params"],
            args["x"],
            args["x2"],
            store=tmp_path / "k.zarr",
            output=args["output"],
            tile=args["tile"],
            strategy=args["strategy"],
            executor="serial",
            progress=False,
            **kw,
        )

    first = run(base)
    before = first.kernel[...]
    with pytest.raises(ResumeMismatchError, match=field) as info:
        run({**base, **change})
    assert field in info.value.differences
    assert "overwrite=True" in str(info.value)
    np.testing.assert_array_equal(ntkdist.open(tmp_path / "k.zarr").kernel[...], before)
    again = run({**base, **change}, overwrite=True)
    assert again.complete and again.fields[field] != first.fields[field]


def test_a_locked_store_is_refused(tmp_path):
    p, x = make_params(), np.random.default_rng(1).normal(size=(6, 3))
    with (
        StoreLock(str(tmp_path / "k.zarr")),
        pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"),
    ):
        ntkdist.compute(mlp, p, x, store=tmp_path / "k.zarr", tile=3, executor="serial")
    assert not (tmp_path / "k.zarr").exists()


# -- kill -9 of the whole job ---------------------------------------------------

MODEL_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(3, 32)), "b1": rng.normal(size=32),
             "w2": rng.normal(size=(32, 2)) / 4}
        return (lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]), p
""")


def _markers(store) -> int:
    """Plan tiles with a marker (a symmetric job also marks each mirror chunk)."""
    try:
        return ntkdist.open(store).progress()[0]
    except Exception:  # the store is not created yet
        return 0


def _chunks_without_marker(store) -> int:
    """Tiles whose data chunk exists but whose marker does not."""
    s = ntkdist.open(store)
    m = s.markers()
    root = store / "kernel" / "c"
    return sum(
        1
        for t in s.plan.tiles()
        if m[t.i, t.j] == 0 and (root / str(t.i) / str(t.j)).exists()
    )


def _kill_and_resume(tmp_path, executor: str, n: int, tile: int, window: int):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    x = np.random.default_rng(3).normal(size=(n, 3))
    np.save(tmp_path / "x.npy", x)
    store = tmp_path / "k.zarr"
    cmd = [
        sys.executable,
        "-m",
        "ntkdist",
        "compute",
        f"{tmp_path}/model.py:make",
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(store),
        "--output",
        "trace",
        "--tile",
        str(tile),
        "--executor",
        executor,
        "--workers",
        "2",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while _markers(store) < 8:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: CLI and its workers
    proc.wait()
    proc.stderr.close()
    s = ntkdist.open(store)
    done, total = s.progress()
    assert 8 <= done < total, "the job was not killed part-way"
    wasted = _chunks_without_marker(store)
    assert wasted <= window  # computed but unrecorded: at most the tiles in flight
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done}/{total} tiles done, computing {total - done}" in rerun.stderr
    final = ntkdist.open(store)
    assert final.complete and final.check_tiles() == ([], [])
    apply_fn, params = load_model(f"{tmp_path}/model.py:make")
    ref = ntkdist.compute(
        apply_fn,
        params,
        x,
        store=tmp_path / "ref.zarr",
        output="trace",
        tile=tile,
        executor="serial",
        progress=False,
    )
    np.testing.assert_array_equal(final.kernel[...], ref.kernel[...])
    return done, total, wasted


def test_kill_9_of_a_serial_cli_job_then_rerun(tmp_path):
    _, _, wasted = _kill_and_resume(tmp_path, "serial", n=64, tile=2, window=1)
    assert wasted <= 1


@pytest.mark.slow
@pytest.mark.cluster
def test_kill_9_of_a_dask_cli_job_then_rerun(tmp_path):
    # Window: 2 futures per worker thread; 2 workers of THREADS_PER_WORKER threads.
    from ntkdist.executors._dask import THREADS_PER_WORKER, WINDOW_PER_THREAD

    window = WINDOW_PER_THREAD * 2 * THREADS_PER_WORKER
    _kill_and_resume(tmp_path, "dask", n=90, tile=3, window=window)


# -- a worker killed mid-tile ----------------------------------------------------


@pytest.mark.cluster
def test_killed_worker_process_the_job_completes_right(tmp_path):
    rng = np.random.default_rng(0)
    p = {
        "w1": rng.normal(size=(8, 64)),
        "b1": rng.normal(size=64),
        "w2": rng.normal(size=(64, 4)) / 8,
    }
    x = rng.normal(size=(160, 8))
    with (
        two_worker_cluster() as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        result: dict[str, Any] = {}
        said = io.StringIO()

        def job():
            try:
                result["store"] = ntkdist.compute(
                    mlp,
                    p,
                    x,
                    store=tmp_path / "k.zarr",
                    output="full",
                    tile=8,
                    strategy="jacobian",
                    client=client,
                    progress=True,
                    stream=said,
                )
            except BaseException as err:  # pragma: no cover - reported below
                result["error"] = err

        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.monotonic() + 120
        while _markers(tmp_path / "k.zarr") < 3:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        victim = None
        while victim is None:  # a worker in the middle of a tile
            assert thread.is_alive() and time.monotonic() < deadline
            busy = [w for w, ts in client.processing().items() if ts]
            victim = busy[0] if busy else None
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = _markers(tmp_path / "k.zarr")
        thread.join(timeout=240)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    s = result["store"]
    assert killed_at < s.plan.n_tiles  # the kill happened with tiles left
    assert s.complete and s.check_tiles() == ([], [])
    np.testing.assert_allclose(
        s.kernel[...], ntkdist.ntk(mlp, p, x), rtol=1e-10, atol=1e-13
    )
    text = said.getvalue()
    assert "[ntkdist] a worker was lost; its tiles are computed again elsewhere" in (
        text
    )
    assert "| lost workers 1" in text.splitlines()[-1]


def test_structured_rules_chosen_for_small_tiles_resume_with_the_same_rules(tmp_path):
    """Where memory makes tiles small, ``structured`` chooses its per-weight rules
    for them; the store records that instance, and a resumed job, a given plan
    and the tile check all compute with it (its fingerprint is unchanged)."""
    from jax import lax

    def conv(p, x):
        y = lax.conv_general_dilated(
            x, p, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.mean(jnp.tanh(y), axis=(1, 2))[:, :10]

    rng = np.random.default_rng(0)
    w = 1 / 17 + 0.05 * rng.normal(size=(3, 3, 32, 64))
    x = rng.normal(size=(40, 8, 8, 32))
    kw = {
        "output": "trace",
        "memory_budget": "320MiB",
        "strategy": "structured",
    }
    plan = ntkdist.plan(conv, w, x, probe=False, **kw)
    assert "nominal_tile=256" not in plan.strategy_repr
    assert "per-weight rules chosen for" in str(plan)
    path = tmp_path / "k.zarr"
    s = ntkdist.compute(conv, w, x, store=path, executor="serial", progress=False, **kw)
    assert s.spec.strategy_repr == plan.strategy_repr
    reference = ntkdist.ntk(conv, w, x, output="trace", strategy="jacobian")
    np.testing.assert_allclose(s.kernel[...], reference, rtol=1e-9)
    # forget two tiles, then run the same call again: it resumes, not refuses
    for key in ("0/0", "1/2"):
        (path / "done" / "c" / key).unlink()
    assert len(list(ntkdist.open(path).todo())) == 2
    s = ntkdist.compute(conv, w, x, store=path, executor="serial", progress=False, **kw)
    assert s.complete and s.spec.strategy_repr == plan.strategy_repr
    np.testing.assert_allclose(s.kernel[...], reference, rtol=1e-9)
    # a plan made beforehand runs its own instance, under auto too
    other = tmp_path / "given.zarr"
    kw["strategy"] = "auto"
    s = ntkdist.compute(
        conv, w, x, store=other, plan=plan, executor="serial", progress=False, **kw
    )
    assert s.spec.strategy_repr == plan.strategy_repr
    np.testing.assert_allclose(s.kernel[...], reference, rtol=1e-9)


def test_a_store_of_a_custom_strategy_resumes_with_that_instance(tmp_path):
    """A strategy whose name is not built in resumes (and adopts a given plan)
    with the instance passed, never looked up by name."""
    from ntkdist.kernels import JacobianContraction

    @dataclasses.dataclass(frozen=True)
    class Mine(JacobianContraction):
        name: ClassVar[str] = "mine"

    p, x = make_params(), np.random.default_rng(1).normal(size=(10, 3))
    kw = {"output": "trace", "tile": 4, "strategy": Mine(), "executor": "serial"}
    path = tmp_path / "k.zarr"
    plan = ntkdist.plan(mlp, p, x, probe=False, output="trace", tile=4, strategy=Mine())
    s = ntkdist.compute(mlp, p, x, store=path, plan=plan, progress=False, **kw)
    (path / "done" / "c" / "0" / "1").unlink()
    s = ntkdist.compute(mlp, p, x, store=path, progress=False, **kw)
    assert s.complete
    np.testing.assert_allclose(
        s.kernel[...], ntkdist.ntk(mlp, p, x, output="trace"), rtol=1e-10
    )
