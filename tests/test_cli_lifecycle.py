"""A job's life through the real command line: its plan, where it runs, its
progress, and Ctrl-C or SIGTERM followed by a resume.

Each test runs ``python -m ntkdist compute`` in a subprocess on a model file
written into ``tmp_path``; interrupted jobs run in a session of their own so
that the signal reaches their whole process group, as a terminal's Ctrl-C or
SLURM's SIGTERM does.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

import ntkdist
from ntkdist.executors._progress import Progress, Rate

MODEL = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(16, 256)) / 4,
             "w2": rng.normal(size=(256, 256)) / 16,
             "w3": rng.normal(size=(256, 4)) / 16}
        return (lambda p, x: jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"]), p
""")
# 36 tiles of about a fifth of a second each on a slow core: long enough to
# be interrupted part-way, short enough to resume in seconds.
SLOW = ["--output", "full", "--tile", "32", "--cache", "none", "--strategy", "jacobian"]


def _files(root, n):
    (root / "model.py").write_text(MODEL)
    np.save(root / "x.npy", np.random.default_rng(1).normal(size=(n, 16)))
    return root


def _cmd(root, out, *extra):
    return [
        sys.executable,
        "-m",
        "ntkdist",
        "compute",
        f"{root}/model.py:make",
        "--x1",
        str(root / "x.npy"),
        "--out",
        str(out),
        *extra,
    ]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(cmd, cwd):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=ENV, timeout=240, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The slow job run without interruption, in-process."""
    root = _files(tmp_path_factory.mktemp("ref"), 256)
    _run(_cmd(root, root / "ref.zarr", *SLOW, "--executor", "serial"), root)
    return np.asarray(ntkdist.open(root / "ref.zarr").kernel[...])


# --- the ETA ------------------------------------------------------------------


def test_rate_leaves_out_each_workers_compiling_first_tile():
    # Two workers compile for 60 s, then finish a tile every 0.5 s together.
    r = Rate(warmup=2)
    r.add(60.0)
    assert r.per_second() is None and r.eta(100) is None
    r.add(60.5)
    assert r.per_second() is None
    for k in range(1, 11):
        r.add(60.5 + 0.25 * k)
    assert r.per_second() == pytest.approx(4.0)
    assert r.eta(100) == pytest.approx(25.0)  # not 100 tiles at 12/62.5 s


def test_progress_says_compiling_until_a_rate_exists():
    out = io.StringIO()
    bar = Progress(done=0, total=10, stream=out)
    bar.rate.warmup = 2
    assert "ETA compiling…" in bar.line()
    bar.rate.add(100.0, 2)
    bar.done = 2
    assert "ETA compiling…" in bar.line()
    bar.rate.add(101.0, 4)
    bar.done = 6
    line = bar.line()
    assert "4.00 tiles/s" in line and "ETA 0:00:01" in line, line


# --- the plan, and where a job runs -------------------------------------------


def test_small_job_runs_in_process_and_prints_its_plan(tmp_path):
    root = _files(tmp_path, 40)
    t0 = time.monotonic()
    text = _run(_cmd(root, root / "k.zarr", "--output", "trace", "--tile", "16"), root)
    took = time.monotonic() - t0
    assert "[ntkdist] plan: trace 40×40" in text, text
    assert "6 tiles of 16×16" in text and "predicted" in text and "on disk" in text
    assert "runs in-process" in text and "force a cluster" in text
    assert "Dask dashboard" not in text
    # The plan comes before the first tile.
    assert text.index("[ntkdist] plan:") < text.index("[ntkdist] tiles")
    assert ntkdist.open(root / "k.zarr").complete
    assert took < 60, took


def test_plan_says_where_compute_would_run(tmp_path):
    root = _files(tmp_path, 40)
    cmd = _cmd(root, root / "k.zarr", "--output", "trace", "--tile", "16")
    plan = [*cmd[:3], "plan", *cmd[4:7]]  # MODEL --x1 X: no --out
    text = _run([*plan, "--output", "trace", "--tile", "16"], root)
    assert "compute runs this job in-process: predicted" in text, text
    text = _run([*plan, "--output", "trace", "--workers", "2"], root)
    assert "compute runs this job" not in text  # a worker count forces a cluster


@pytest.mark.cluster
def test_workers_force_a_cluster(tmp_path):
    root = _files(tmp_path, 40)
    cmd = _cmd(root, root / "k.zarr", "--output", "trace", "--tile", "16")
    text = _run([*cmd, "--workers", "2"], root)
    assert "[ntkdist] plan:" in text and "on 2 workers" in text
    assert "runs in-process" not in text and "Dask dashboard" in text
    assert ntkdist.open(root / "k.zarr").complete


# --- Ctrl-C and SIGTERM -------------------------------------------------------


def _tiles_on_disk(store):
    try:
        return int((zarr.open_group(str(store), mode="r")["done"][...] != 0).sum())
    except Exception:
        return 0


def _group_gone(pgid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _interrupt_then_resume(root, reference, sig, extra):
    out = root / "k.zarr"
    cmd = _cmd(root, out, *SLOW, *extra)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=root,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _tiles_on_disk(out) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no tile within 120 s"
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = stdout + stderr
    assert proc.returncode == 128 + sig, text
    assert "Traceback" not in text and "distributed.scheduler - ERROR" not in text
    assert "ERROR" not in text, text
    lines = stderr.strip().splitlines()
    # Only the job's own progress lines before it, and one line after.
    assert all(ln.startswith("[ntkdist]") for ln in lines[:-1]), text
    assert lines[-1].startswith("ntkdist compute: interrupted: "), text
    assert (
        "tiles are on disk" in lines[-1]
        and "run the same command to resume" in (lines[-1])
    )
    assert _group_gone(proc.pid), "processes of the job's group outlived it"
    status = subprocess.run(
        [sys.executable, "-m", "ntkdist", "status", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert "lock         free" in status.stdout, status.stdout
    done, total = ntkdist.open(out).progress()
    assert 0 < done < total
    assert f"{done} of {total} tiles are on disk" in lines[-1]

    text = _run(cmd, root)  # the same command resumes
    assert f"{done}/{total} tiles done, computing {total - done}" in text, text
    kernel = np.asarray(ntkdist.open(out).kernel[...])
    assert kernel.tobytes() == reference.tobytes()


@pytest.mark.slow
def test_ctrl_c_in_process_says_how_to_resume(tmp_path, reference):
    root = _files(tmp_path, 256)
    _interrupt_then_resume(root, reference, signal.SIGINT, ["--executor", "serial"])


@pytest.mark.cluster
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_signal_to_a_cluster_job_stops_it_quietly(tmp_path, reference, sig):
    root = _files(tmp_path, 256)
    _interrupt_then_resume(root, reference, sig, ["--workers", "2"])


@pytest.mark.cluster
def test_ctrl_c_while_the_cluster_starts_is_one_line(tmp_path):
    """Ctrl-C while the workers still import JAX: no tracebacks from them, nor
    from Dask closing the half-started cluster at exit."""
    root = _files(tmp_path, 256)
    out = root / "k.zarr"
    proc = subprocess.Popen(
        [*_cmd(root, out, *SLOW), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=root,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists():  # the store is created just before the cluster
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no store within 120 s"
            time.sleep(0.05)
        time.sleep(0.5)  # the worker processes are starting
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = stdout + stderr
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "ERROR" not in text, text
    lines = stderr.strip().splitlines()
    assert all(ln.startswith("[ntkdist]") for ln in lines[:-1]), text
    assert lines[-1].startswith("ntkdist compute: interrupted: "), text
    assert _group_gone(proc.pid), "processes of the job's group outlived it"


# --- the Python API -----------------------------------------------------------


def test_api_keyboard_interrupt_leaves_a_free_lock_and_a_resumable_store(tmp_path):
    from ntkdist.executors import AbstractExecutor, SerialExecutor
    from ntkdist.storage import StoreLock

    class Interrupting(AbstractExecutor):
        n_workers = 1

        def run(self, spec, model, params, todo, on_done):
            def stop_after_two(tile, checksums):
                on_done(tile, checksums)
                if tile is todo[1]:
                    raise KeyboardInterrupt

            return SerialExecutor().run(spec, model, params, todo, stop_after_two)

    import jax.numpy as jnp

    def f(p, x):
        return jnp.tanh(x @ p["w"])

    p = {"w": np.random.default_rng(0).normal(size=(3, 2))}
    x = np.random.default_rng(1).normal(size=(12, 3))
    path = tmp_path / "k.zarr"
    kw = {"store": path, "output": "trace", "tile": 4, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        ntkdist.compute(f, p, x, executor=Interrupting(), **kw)
    assert StoreLock(str(path)).state()[0] == "free"
    assert ntkdist.open(path).progress() == (2, 6)
    s = ntkdist.compute(f, p, x, executor="serial", **kw)
    assert s.complete
    np.testing.assert_allclose(
        s.kernel[...], ntkdist.ntk(f, p, x, output="trace"), rtol=1e-12
    )
