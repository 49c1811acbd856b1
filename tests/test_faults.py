"""Faults handled plainly: killed writes, read-only and full stores, the lock."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ntkdist
from ntkdist._cli import load_model

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


def _cli(*args: str, **kw):
    return subprocess.run(
        [sys.executable, "-m", "ntkdist", *args],
        env=ENV,
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
