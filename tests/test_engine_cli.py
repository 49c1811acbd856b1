"""The ntkdist command line: compute, plan, status, verify --repair, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import ntkdist
from ntkdist._cli import main

MODEL_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np

    def make():
        rng = np.random.default_rng(0)
        p = {"w1": rng.normal(size=(3, 16)), "b1": rng.normal(size=16),
             "w2": rng.normal(size=(16, 2)) / 4}
        return (lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]), p

    def not_a_pair():
        return 42

    def three():
        return 1, 2, 3
""")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(13, 3))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", a=rng.normal(size=(6, 3)), b=rng.normal(size=(6, 5)))
    z = zarr.create_array(
        store=str(tmp_path / "x.zarr"), shape=x.shape, chunks=(4, 3), dtype="float64"
    )
    z[...] = x
    return tmp_path


def _model(files):
    return f"{files}/model.py:make"


def test_plan_prints_figures_without_computing(files, capsys):
    assert (
        main(
            [
                "plan",
                _model(files),
                "--x1",
                str(files / "x.npy"),
                "--output",
                "trace",
                "--tile",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tiles to compute    6" in out and "estimated time" in out
    assert (
        main(
            [
                "plan",
                _model(files),
                "--x1",
                str(files / "x.npy"),
                "--tile",
                "5",
                "--json",
                "--no-probe",
            ]
        )
        == 0
    )
    plan = ntkdist.Plan.from_json(capsys.readouterr().out)
    assert plan.n_tiles == 6 and plan.output == "full"
    assert not (files / "k.zarr").exists()


@pytest.mark.parametrize(
    "x2",
    [
        None,  # symmetric
        "d.npz:a",  # an .npz key
        "x.zarr",  # a Zarr array
    ],
)
def test_compute_then_status(files, capsys, x2):
    args = [
        "compute",
        _model(files),
        "--x1",
        str(files / "x.npy"),
        "--out",
        str(files / "k.zarr"),
        "--output",
        "diagonal",
        "--tile",
        "4",
        "--executor",
        "serial",
    ]
    if x2:
        args += ["--x2", str(files / x2)]
    assert main(args) == 0
    assert "written to" in capsys.readouterr().out
    s = ntkdist.open(files / "k.zarr")
    from ntkdist._cli import load_input, load_model

    f, p = load_model(_model(files))
    ref = ntkdist.ntk(
        f,
        p,
        np.load(files / "x.npy"),
        None if x2 is None else np.asarray(load_input(str(files / x2))),
        output="diagonal",
    )
    np.testing.assert_allclose(s.kernel[...], ref, rtol=1e-10)
    assert main(["status", str(files / "k.zarr")]) == 0
    out = capsys.readouterr().out
    assert f"{s.plan.n_tiles}/{s.plan.n_tiles} tiles (100%) complete" in out
    assert s.fingerprint in out and "model.py:make" in out
    assert main(["status", str(files / "k.zarr"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True


def test_verify_finds_and_repair_fixes_exactly_the_bad_tiles(files, capsys):
    store = files / "k.zarr"
    assert (
        main(
            [
                "compute",
                _model(files),
                "--x1",
                str(files / "x.npy"),
                "--out",
                str(store),
                "--output",
                "trace",
                "--tile",
                "4",
                "--executor",
                "serial",
                "--quiet",
            ]
        )
        == 0
    )
    clean = ntkdist.open(store).kernel[...]
    chunks = store / "kernel" / "c"
    (chunks / "0" / "1").write_bytes((chunks / "0" / "1").read_bytes()[:7])
    (chunks / "2" / "1").write_bytes((chunks / "3" / "3").read_bytes())  # mirror of 1.2
    mtimes = {f: f.stat().st_mtime_ns for f in chunks.rglob("*") if f.is_file()}
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "0 missing, 2 corrupt" in out
    assert "corrupt tile 0.1" in out and "corrupt tile 1.2" in out
    assert main(["verify", str(store), "--repair", "--quiet"]) == 0
    assert "after repair: 0 missing, 0 corrupt" in capsys.readouterr().out
    np.testing.assert_array_equal(ntkdist.open(store).kernel[...], clean)
    rewritten = {f for f, t in mtimes.items() if f.stat().st_mtime_ns != t}
    bad = {
        chunks / "0" / "1",
        chunks / "1" / "0",
        chunks / "2" / "1",
        chunks / "1" / "2",
    }
    assert rewritten <= bad  # nothing else was recomputed
    assert main(["verify", str(store)]) == 0


def test_verify_repair_reports_holes_and_fills_them(files, capsys):
    store = files / "k.zarr"
    assert (
        main(
            [
                "compute",
                _model(files),
                "--x1",
                str(files / "x.npy"),
                "--out",
                str(store),
                "--output",
                "pntk",
                "--tile",
                "5",
                "--executor",
                "serial",
                "--quiet",
            ]
        )
        == 0
    )
    s = zarr.open_group(str(store), mode="r+")
    s["done"][0, 2] = 0  # a lost marker: the tile counts as missing
    assert main(["verify", str(store)]) == 1
    assert "1 missing, 0 corrupt" in capsys.readouterr().out
    assert main(["verify", str(store), "--repair", "--quiet"]) == 0
    assert ntkdist.open(store).complete


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("missing.py:make", "does not exist"),  # no such file
        ("model.py:nothing", "has no callable 'nothing'"),  # no such factory
        ("model.py:not_a_pair", "returned int; expected a pair"),  # wrong return
        ("model.py:three", "tuple of 3 items"),  # wrong arity
        ("no_such_pkg_xyz.mod:make", "cannot be imported"),  # no such module
        ("justaname", "expected 'path/to/file.py:factory'"),  # malformed spec
    ],
)
def test_bad_model_spec(files, capsys, monkeypatch, model, message):
    monkeypatch.chdir(files)
    assert main(["compute", model, "--x1", "x.npy", "--out", "k.zarr"]) == 2
    assert message in capsys.readouterr().err
    assert not (files / "k.zarr").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--x2", "d.npz:b"], "x1 has samples of shape (3,) but x2 has (5,)"),
        (["--x2", "d.npz:zz"], "no array 'zz'; it holds a, b"),  # no such key
        (["--x2", "nope.npy"], "--x2 nope.npy: no such file"),  # no such input
        (["--memory-budget", "1MiB"], "needs at least"),  # budget too small
        (["--memory-budget", "plenty"], "not a size"),  # malformed budget
    ],
)
def test_bad_inputs_are_clear_errors(files, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(files)
    rc = main(
        [
            "compute",
            _model(files),
            "--x1",
            str(files / "x.npy"),
            "--out",
            str(files / "k.zarr"),
            "--executor",
            "serial",
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (files / "k.zarr").exists()


def test_errors_keep_what_was_written(files, capsys):
    store = files / "k.zarr"

    def compute(out, output="trace", *extra):
        return main(
            [
                "compute",
                _model(files),
                "--x1",
                str(files / "x.npy"),
                "--out",
                str(out),
                "--output",
                output,
                "--tile",
                "4",
                "--executor",
                "serial",
                "--quiet",
                *extra,
            ]
        )

    assert compute(store) == 0
    before = ntkdist.open(store).kernel[...]
    assert compute(store, "full") == 2
    assert "output (stored" in capsys.readouterr().err
    assert compute(store, "trace", "--memory-budget", "1KiB") == 2
    assert "needs at least" in capsys.readouterr().err
    np.testing.assert_array_equal(ntkdist.open(store).kernel[...], before)
    assert ntkdist.open(store).complete
    (files / "other").mkdir()
    (files / "other" / "a.txt").write_text("keep")
    assert compute(files / "other") == 2
    assert "not an ntkdist kernel store" in capsys.readouterr().err
    assert (files / "other" / "a.txt").read_text() == "keep"
    assert main(["status", str(files / "other")]) == 2


def test_console_entry_point_runs_in_a_subprocess(files):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntkdist",
            "plan",
            _model(files),
            "--x1",
            str(files / "x.npy"),
            "--output",
            "pntk",
            "--tile",
            "7",
            "--no-probe",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "tiles to compute    3" in out.stdout
    assert "float64" in out.stdout  # float64 inputs compute in float64
