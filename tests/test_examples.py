"""Every script in examples/ runs, on small sizes, and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ntkdist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args: str | Path, cwd: Path, timeout: int = 240) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NTKDIST_EXAMPLE_SMALL": "1"}
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _accuracies(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"accuracy (\d\.\d+)", text)]


def test_every_example_has_a_test():
    tested = {"digits_mlp", "digits_regression", *(f"frameworks_{n}" for n in FW)}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_digits_mlp_quick_start_serial(tmp_path):
    """The README quick start on 100 digits, with the serial executor, then a plot."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = _run(EXAMPLES / "digits_mlp.py", "scratch/digits.npz", cwd=tmp_path)
    assert "wrote scratch/digits.npz: x (1797, 64) float32" in out
    with np.load(tmp_path / "scratch" / "digits.npz") as data:
        np.savez(tmp_path / "small.npz", x=data["x"][:100], y=data["y"][:100])
    _run(
        "-m", "ntkdist", "compute", f"{EXAMPLES / 'digits_mlp.py'}:factory",
        "--x1", "small.npz:x", "--out", "k.zarr", "--output", "trace",
        "--executor", "serial", "--tile", "64", cwd=tmp_path,
    )  # fmt: skip
    store = ntkdist.open(tmp_path / "k.zarr")
    assert store.complete and store.kernel.shape == (100, 100)
    k = np.asarray(store.kernel[...])
    np.testing.assert_allclose(k, k.T, rtol=1e-6)
    assert (np.diag(k) > 0).all()
    out = _run(
        "-m", "ntkdist", "plot", "k.zarr", "--out", "k.png",
        "--labels", "small.npz:y", cwd=tmp_path,
    )  # fmt: skip
    assert "plot saved to k.png" in out
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_digits_regression(tmp_path):
    pytest.importorskip("sklearn")
    out = _run(
        EXAMPLES / "digits_regression.py", "--train", "100", "--test", "100",
        "--width", "64", cwd=tmp_path,
    )  # fmt: skip
    rows = re.findall(r"^(full|trace|pntk)\s+\(.*?\)\s+(\d\.\d+)", out, re.M)
    assert [name for name, _ in rows] == ["full", "trace", "pntk"]
    assert all(float(acc) > 0.6 for _, acc in rows), out
    assert out.count("relative Frobenius difference") == 2


# Each framework example and how many accuracy lines it prints.
FW = {"equinox": 1, "flax": 2, "haiku": 2}


@pytest.mark.slow  # 20-35 s each: JAX, the framework and a compute job
@pytest.mark.parametrize("framework", FW)
def test_framework_example(tmp_path, framework):
    pytest.importorskip("sklearn")
    pytest.importorskip(framework)
    out = _run(EXAMPLES / f"frameworks_{framework}.py", cwd=tmp_path)
    accs = _accuracies(out)
    assert len(accs) == FW[framework], out
    assert all(a > 0.6 for a in accs), out
