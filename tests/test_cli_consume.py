"""The ``regress`` and ``spectrum`` subcommands on real stores."""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist._cli._consume import main, register
from ntkdist.regression import kernel_ridge, spectrum


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = np.random.default_rng(0)
    params = {
        "w1": r.standard_normal((4, 12)) / 2,
        "w2": r.standard_normal((12, 3)) / 3,
    }
    x_train, x_test = r.standard_normal((18, 4)), r.standard_normal((7, 4))
    kw = {"tile": 5, "executor": "serial", "progress": False}
    train = ntkdist.compute(
        mlp, params, x_train, store=root / "train", output="full", **kw
    )
    cross = ntkdist.compute(
        mlp, params, x_test, x_train, store=root / "cross", output="full", **kw
    )
    classes = r.integers(0, 3, 18)
    np.save(root / "y.npy", classes)
    np.save(root / "y_test.npy", r.integers(0, 3, 7))
    np.save(root / "y_short.npy", classes[:-1])
    return {"root": root, "train": train, "cross": cross, "classes": classes}


def test_regress_saves_predictions_and_prints_metrics(job, capsys):
    root = job["root"]
    status = main(
        [
            "regress",
            "--train-kernel",
            str(root / "train"),
            "--labels",
            str(root / "y.npy"),
            "--cross-kernel",
            str(root / "cross"),
            "--ridge",
            "1e-3,1e-1",
            "--out",
            str(root / "preds.npz"),
            "--test-labels",
            str(root / "y_test.npy"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    saved = np.load(root / "preds.npz")
    expected = kernel_ridge(job["train"], np.eye(3)[job["classes"]], [1e-3, 1e-1])
    np.testing.assert_allclose(
        saved["predictions"], expected.predict(job["cross"]), atol=1e-10
    )
    assert saved["predictions"].shape == (2, 7, 3)
    assert "ridge=0.001" in out and "ridge=0.1" in out
    assert out.count("test_accuracy=") == 2 and "test_mse=" in out


def test_regress_reports_bad_labels(job, capsys):
    root = job["root"]
    status = main(
        [
            "regress",
            "--train-kernel",
            str(root / "train"),
            "--labels",
            str(root / "y_short.npy"),
            "--cross-kernel",
            str(root / "cross"),
            "--ridge",
            "0.1",
            "--out",
            str(root / "p.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "y_train has shape (17, 3)" in err and "18 samples" in err
    with pytest.raises(SystemExit):
        main(
            [
                "regress",
                "--train-kernel",
                "a",
                "--labels",
                "b",
                "--cross-kernel",
                "c",
                "--ridge",
                "x,y",
                "--out",
                "d",
            ]
        )


def test_regress_refuses_non_positive_ridge(job, capsys):
    root = job["root"]
    status = main(
        [
            "regress",
            "--train-kernel",
            str(root / "train"),
            "--labels",
            str(root / "y.npy"),
            "--cross-kernel",
            str(root / "cross"),
            "--ridge",
            "0",
            "--out",
            str(root / "p.npz"),
        ]
    )
    assert status == 2
    assert "positive" in capsys.readouterr().err


def test_spectrum_prints_eigenvalues_and_plots(job, capsys, tmp_path):
    status = main(
        [
            "spectrum",
            str(job["root"] / "train"),
            "--k",
            "5",
            "--plot",
            str(tmp_path / "s.png"),
            "--vectors",
            str(tmp_path / "v.npy"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    ref = spectrum(job["train"], k=5)
    assert "condition number" in out
    assert f"{ref.eigenvalues[0]:.6g}" in out
    assert np.load(tmp_path / "v.npy").shape == (18 * 3, 5)


def test_register_adds_both_subcommands():
    parser = argparse.ArgumentParser(prog="ntkdist")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["spectrum", "somewhere", "--k", "3"])
    assert args.command == "spectrum" and args.k == 3 and callable(args.func)
    args = parser.parse_args(
        [
            "regress",
            "--train-kernel",
            "a",
            "--labels",
            "b",
            "--cross-kernel",
            "c",
            "--ridge",
            "1e-3,0.5",
            "--out",
            "d",
        ]
    )
    assert args.ridge == [1e-3, 0.5] and args.method == "auto"


def test_main_cli_runs_the_consumer_subcommands(job, capsys):
    from ntkdist._cli import main as ntkdist_main

    status = ntkdist_main(
        ["spectrum", str(job["root"] / "train"), "--k", "3", "--no-smallest"]
    )
    out = capsys.readouterr().out
    assert status == 0 and "top 3 eigenvalues" in out and "condition" not in out
