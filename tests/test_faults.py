"""Faults handled plainly: killed writes, read-only and full stores, the lock."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ntkdist
from ntkdist._cli import load_model, main
from ntkdist.storage._lock import HEARTBEAT_ENV, STALE_ENV

MODEL_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(3, 16)), "b1": rng.normal(size=16),
             "w2": rng.normal(size=(16, 2)) / 4}
        return (lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]), p
""")

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cli(*args: str, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "ntkdist", *args],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 300),
        **kw,
    )


def _job(tmp_path, n: int, *, store=None, tile: int, output: str = "full"):
    """A CLI compute command for an MLP on ``n`` samples."""
    (tmp_path / "model.py").write_text(MODEL_FILE)
    x = np.random.default_rng(3).normal(size=(n, 3))
    np.save(tmp_path / "x.npy", x)
    store = store or tmp_path / "k.zarr"
    args = [
        "compute",
        f"{tmp_path}/model.py:make",
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(store),
        "--output",
        output,
        "--tile",
        str(tile),
        "--executor",
        "serial",
    ]
    return args, x


def _reference(tmp_path, x, *, tile: int, output: str = "full"):
    apply_fn, params = load_model(f"{tmp_path}/model.py:make")
    return ntkdist.compute(
        apply_fn,
        params,
        x,
        store=tmp_path / "ref.zarr",
        output=output,
        tile=tile,
        executor="serial",
        progress=False,
    ).kernel[...]


@contextlib.contextmanager
def read_only(directory):
    """``directory`` made read-only by a read-only bind mount over itself."""
    d = str(directory)
    if subprocess.run(["mount", "--bind", d, d], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(
            ["mount", "-o", "remount,ro,bind", d], check=True, capture_output=True
        )
        yield directory
    finally:
        subprocess.run(["umount", d], check=True)


@contextlib.contextmanager
def tmpfs(directory, size: str):
    """A fresh tmpfs of ``size`` mounted at ``directory``."""
    directory.mkdir()
    d = str(directory)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True
    )
    if done.returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield directory
    finally:
        subprocess.run(["umount", d], check=True)


def _fill_up(directory) -> None:
    """Write a file in ``directory`` until its file system is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        for piece in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * piece)
            except OSError:
                pass


def _partials(store) -> list[str]:
    root = store / "kernel" / "c"
    if not root.exists():
        return []
    return [str(p) for p in root.rglob("*.partial")]


# -- a job killed in the middle of a direct chunk write -------------------------


@pytest.mark.slow
def test_sigkill_during_a_direct_chunk_write_leaves_nothing_behind(tmp_path):
    # Chunks of 1024 x 1024 x 2 x 2 float64 (32 MiB) take the direct writer.
    args, x = _job(tmp_path, 2048, tile=1024)
    store = tmp_path / "k.zarr"
    caught = []
    for _ in range(3):  # each try starts a job and kills it at its first write
        proc = subprocess.Popen(
            [sys.executable, "-m", "ntkdist", *args, "--quiet"],
            env=ENV,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not (caught := _partials(store)):
            assert proc.poll() is None, "the job ended before a chunk write was seen"
            assert time.monotonic() < deadline
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if _partials(store):
            break
    assert caught and _partials(store), "no write was interrupted"
    assert not ntkdist.open(store).complete

    verify = _cli("verify", str(store))
    assert verify.returncode == 1
    assert "unfinished chunk writes (*.partial)" in verify.stdout
    assert "unfinished chunk write " + _partials(store)[0] in verify.stdout

    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "unfinished chunk write(s) (*.partial) left by an interrupted job" in (
        rerun.stderr
    )
    assert _partials(store) == []
    final = ntkdist.open(store)
    assert final.complete and final.check_tiles() == ([], [])
    np.testing.assert_array_equal(final.kernel[...], _reference(tmp_path, x, tile=1024))


def test_verify_repair_removes_partial_files_and_calls_a_deleted_chunk_missing(
    tmp_path,
):
    _, x = _job(tmp_path, 12, tile=4, output="trace")
    store = tmp_path / "k.zarr"
    apply_fn, params = load_model(f"{tmp_path}/model.py:make")
    clean = ntkdist.compute(
        apply_fn,
        params,
        x,
        store=store,
        output="trace",
        tile=4,
        executor="serial",
        progress=False,
        model_spec=f"{tmp_path}/model.py:make",
    ).kernel[...]
    # A writer killed mid-write (a real process, SIGKILLed while writing).
    leftover = store / "kernel" / "c" / "0" / "1.0123abcd.partial"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "f = open(sys.argv[1], 'wb'); f.write(b'x' * 1000); f.flush()\n"
            "print('ok', flush=True); time.sleep(60)",
            str(leftover),
        ],
        stdout=subprocess.PIPE,
    )
    assert writer.stdout.readline() == b"ok\n"
    writer.kill()
    writer.wait()
    writer.stdout.close()
    (store / "kernel" / "c" / "1" / "2").unlink()  # tile 1.2's own chunk

    verify = _cli("verify", str(store))
    assert verify.returncode == 1
    assert "1 missing, 0 corrupt, 1 unfinished chunk writes (*.partial)" in (
        verify.stdout
    )
    gone = "missing tile 1.2 (rows 4:8, cols 8:12): marked done, its chunk file is gone"
    assert gone in verify.stdout
    assert f"unfinished chunk write {leftover}" in verify.stdout

    repair = _cli("verify", str(store), "--repair")
    assert repair.returncode == 0, repair.stderr
    assert "after repair: 0 missing, 0 corrupt" in repair.stdout
    assert not leftover.exists()
    assert _cli("verify", str(store)).returncode == 0
    np.testing.assert_array_equal(ntkdist.open(store).kernel[...], clean)


# -- a finished store in a read-only directory ----------------------------------


def test_a_finished_store_in_a_read_only_directory_needs_no_lock(tmp_path):
    where = tmp_path / "ro"
    where.mkdir()
    args, x = _job(tmp_path, 12, store=where / "k.zarr", tile=4, output="trace")
    apply_fn, params = load_model(f"{tmp_path}/model.py:make")
    ntkdist.compute(
        apply_fn,
        params,
        x,
        store=where / "k.zarr",
        output="trace",
        tile=4,
        executor="serial",
        progress=False,
    )
    with read_only(where):
        again = _cli(*args)
        assert again.returncode == 0, again.stderr
        assert f"store {where / 'k.zarr'}: 6/6 tiles done, nothing to compute" in (
            again.stderr
        )
        assert not (where / "k.zarr.lock").exists()
        assert "written to" in again.stdout


# -- the lock: fenced, and taken over aloud ---------------------------------------


def _markers(store) -> int:
    try:
        return ntkdist.open(store).progress()[0]
    except Exception:  # not created yet
        return 0


@pytest.mark.slow
def test_a_job_paused_past_the_lock_timeout_stops_when_it_resumes(
    tmp_path, monkeypatch, capsys
):
    args, x = _job(tmp_path, 40, tile=2, output="trace")
    store = tmp_path / "k.zarr"
    env = {**ENV, STALE_ENV: "2", HEARTBEAT_ENV: "0.2"}
    monkeypatch.setenv(STALE_ENV, "2")
    first = subprocess.Popen(
        [sys.executable, "-m", "ntkdist", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _markers(store) < 3:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGSTOP)  # a suspended laptop, a frozen mount
        paused = _markers(store)
        assert paused < ntkdist.open(store).plan.n_tiles
        time.sleep(2.5)
        host = socket.gethostname()
        assert main(["status", str(store)]) == 0
        assert (
            f"lock         stale (holder silent): pid {first.pid} on host {host}, "
            "silent for "
        ) in capsys.readouterr().out
        second = _cli(*args, env=env)
        assert second.returncode == 0, second.stderr
        assert (
            f"[ntkdist] taking over the lock of pid {first.pid} on host {host}, "
            "silent for "
        ) in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    err = first.communicate(timeout=120)[1]
    assert first.returncode == 2, err
    assert "ntkdist compute: error: this job lost the store's lock" in err
    assert "another job took the store over; this job stops without writing" in err
    final = ntkdist.open(store)
    assert final.complete and final.check_tiles() == ([], [])
    np.testing.assert_array_equal(
        final.kernel[...], _reference(tmp_path, x, tile=2, output="trace")
    )


def test_status_says_a_dead_holders_lock_is_stale(tmp_path, capsys):
    store = tmp_path / "k.zarr"
    apply_fn, params = load_model(_job(tmp_path, 6, tile=2)[0][1])
    ntkdist.compute(
        apply_fn,
        params,
        np.ones((6, 3)),
        store=store,
        tile=3,
        executor="serial",
        progress=False,
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from ntkdist.storage import StoreLock\n"
            "StoreLock(sys.argv[1]).acquire(); print('ok', flush=True)\n"
            "time.sleep(60)",
            str(store),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline() == b"ok\n"
    assert main(["status", str(store)]) == 0
    assert f"lock         held by pid {holder.pid} on host" in capsys.readouterr().out
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert main(["status", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"lock         stale (holder dead): pid {holder.pid} on host" in out


# -- read-only and full stores: one line, at once, resumable ---------------------


def _compute(tmp_path, x, store, *, tile, output, progress=False):
    apply_fn, params = load_model(f"{tmp_path}/model.py:make")
    return ntkdist.compute(
        apply_fn,
        params,
        x,
        store=store,
        output=output,
        tile=tile,
        executor="serial",
        progress=progress,
    )


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("ntkdist compute: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_read_only_store_directory_fails_before_any_tile(tmp_path):
    store = tmp_path / "k.zarr"
    args, x = _job(tmp_path, 12, tile=2, output="trace")
    s = _compute(tmp_path, x, store, tile=2, output="trace")
    s = ntkdist.KernelStore.open(str(store), mode="r+")
    s.clear_tiles(s.plan.tiles()[-4:])  # an unfinished job, parent writable
    before = s.markers().copy()
    with read_only(store):
        t0 = time.monotonic()
        failed = _cli(*args)
        took = time.monotonic() - t0
        assert failed.returncode == 2
        line = _one_error_line(failed.stderr)
        assert line.startswith(
            f"ntkdist compute: error: cannot write the kernel store: the file system "
            f"at {store} is read-only (EROFS; writing {store}/kernel); the job still "
            "needs 192 B for 4 tiles. Nothing was lost: remount it read-write"
        ), line
        assert "then run the same job again to compute only the missing tiles" in line
        assert "tiles/s" not in failed.stderr  # no tile was started
        np.testing.assert_array_equal(ntkdist.open(store).markers(), before)
    assert took < 60
    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "17/21 tiles done, computing 4" in rerun.stderr
    np.testing.assert_array_equal(
        ntkdist.open(store).kernel[...],
        _reference(tmp_path, x, tile=2, output="trace"),
    )


def test_a_store_on_too_small_a_file_system_is_refused_before_any_tile(tmp_path):
    args, _ = _job(tmp_path, 600, tile=100, output="trace")
    with tmpfs(tmp_path / "small", "1m") as small:
        store = small / "k.zarr"
        args[args.index("--out") + 1] = str(store)
        failed = _cli(*args)
        assert failed.returncode == 2
        line = _one_error_line(failed.stderr)
        assert (
            f"cannot write the kernel store: the file system at {small} is too small "
            "for it (ENOSPC, "
        ) in line
        assert "free); the job still needs 2.7 MiB for 21 tiles." in line
        assert ntkdist.open(store).progress()[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "executor", ["serial", pytest.param("dask", marks=pytest.mark.cluster)]
)
def test_a_disk_that_fills_up_mid_job_stops_it_at_once_and_it_resumes(
    tmp_path, executor
):
    args, x = _job(tmp_path, 40, tile=2, output="trace")
    args[args.index("--executor") + 1] = executor
    args += ["--workers", "2"]
    with tmpfs(tmp_path / "disk", "8m") as disk:
        store = disk / "k.zarr"
        args[args.index("--out") + 1] = str(store)
        job = subprocess.Popen(
            [sys.executable, "-m", "ntkdist", *args],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while _markers(store) < 3:
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        _fill_up(disk)
        full_at = time.monotonic()
        err = job.communicate(timeout=120)[1]
        assert time.monotonic() - full_at < 30
        assert job.returncode == 2, err
        line = _one_error_line(err)
        assert (
            f"cannot write the kernel store: the file system at {disk} is full "
            "(ENOSPC, 0 B free); the job still needs "
        ) in line, line
        assert "free space there or move the store to a larger file system" in line
        done, total = ntkdist.open(store).progress()
        assert done < total
        assert f"for {total - done} tiles." in line
        (disk / "filler").unlink()
        rerun = _cli(*args)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{done}/{total} tiles done, computing {total - done}" in rerun.stderr
        final = ntkdist.open(store)
        assert final.complete and final.check_tiles() == ([], [])
        kernel = final.kernel[...]
    np.testing.assert_array_equal(
        kernel, _reference(tmp_path, x, tile=2, output="trace")
    )


# -- bad input said plainly; a MODEL file imports what lies beside it ---------------


@pytest.mark.parametrize(
    ("x1", "extra", "said", "unsaid"),
    [
        (
            np.array([1.0, "a", None], dtype=object),
            [],
            "holds an array of Python objects (dtype object), not numbers; save a "
            "numeric array instead",
            "",
        ),
        (
            np.ones(10),
            [],
            "x1 is 1-D, so it was read as samples with no feature axis, and "
            "apply_fn(params, x) failed on a batch of shape (2,) (TypeError: ",
            "",
        ),
        (
            np.ones((10, 3)),
            ["--memory-budget", "1KiB", "--output", "trace"],
            "--memory-budget 1.0 KiB cannot hold a 2×2 tile of --output trace with "
            "any strategy: --strategy auto tried jacobian (needs at least ",
            "memory_budget",
        ),
    ],
)
def test_bad_input_is_one_plain_line(tmp_path, x1, extra, said, unsaid):
    args, _ = _job(tmp_path, 4, tile=2)
    np.save(tmp_path / "x.npy", x1, allow_pickle=True)
    failed = _cli(*args, *extra)
    assert failed.returncode == 2
    line = _one_error_line(failed.stderr)
    assert said in line, line
    assert not unsaid or unsaid not in line, line
    if extra:
        assert "The smallest budget that works is 301.0 MiB (with " in line, line
        assert line.endswith("raise --memory-budget to at least that."), line


SIBLING = textwrap.dedent("""
    import jax.numpy as jnp

    def layer(w, x):
        return jnp.tanh(x @ w)
""")

MODEL_WITH_SIBLING = textwrap.dedent("""
    import numpy as np
    from blocks import layer

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(3, 8)), "w2": rng.normal(size=(8, 2))}
        return (lambda p, x: layer(p["w1"], x) @ p["w2"]), p
""")


@pytest.mark.cluster
def test_a_model_file_imports_a_module_beside_it_here_and_on_workers(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "blocks.py").write_text(SIBLING)
    (models / "net.py").write_text(MODEL_WITH_SIBLING)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 3)))
    done = _cli(
        "compute",
        f"{models}/net.py:make",
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "k.zarr"),
        "--tile",
        "3",
        "--workers",
        "1",
        "--quiet",
        cwd=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert ntkdist.open(tmp_path / "k.zarr").complete


# -- noise: one line per distinct error, tracebacks to a log ------------------------

FAILS_ON_WORKERS = textwrap.dedent("""
    import multiprocessing

    import jax.numpy as jnp
    import numpy as np

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(3, 8)), "w2": rng.normal(size=(8, 2))}

        def f(p, x):
            if multiprocessing.parent_process() is not None:  # a worker
                raise RuntimeError("this model refuses to run on a worker")
            return jnp.tanh(x @ p["w1"]) @ p["w2"]

        return f, p
""")


@pytest.mark.cluster
def test_failed_tiles_are_one_line_each_distinct_error_with_tracebacks_in_a_log(
    tmp_path,
):
    (tmp_path / "model.py").write_text(FAILS_ON_WORKERS)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(12, 3)))
    store = tmp_path / "k.zarr"
    failed = _cli(
        "compute",
        f"{tmp_path}/model.py:make",
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(store),
        "--tile",
        "3",
        "--strategy",
        "jacobian",
        "--workers",
        "2",
    )
    assert failed.returncode == 2
    log = tmp_path / "k.zarr.log"
    said = [ln for ln in failed.stderr.splitlines() if " failed: " in ln]
    assert len(said) == 1, failed.stderr  # ten tiles failed, for one reason
    assert said[0].startswith("[ntkdist] tile ")
    assert said[0].endswith(
        "failed: RuntimeError: this model refuses to run on a worker "
        f"(full traceback in {log})"
    )
    assert "Traceback" not in failed.stderr and "Compute Failed" not in failed.stderr
    assert "| failed 10" in failed.stderr  # the progress line counts them
    assert (
        "ntkdist compute: error: 10 of 10 tiles failed (first: tile "
    ) in failed.stderr
    assert f"full tracebacks in {log})." in failed.stderr
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") >= 10
    assert "this model refuses to run on a worker" in text
