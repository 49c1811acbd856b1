"""The README quick start: a file-defined model through the CLI, on worker processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ntkdist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_mlp.py"


@pytest.mark.cluster
def test_file_model_through_cli_on_worker_processes(tmp_path):
    """Regression: a file-defined model used to fail to unpickle on the workers."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import digits_mlp
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    x, _ = digits_mlp.load_digits()
    x = x[:70]
    np.savez(tmp_path / "digits.npz", x=x)
    out = tmp_path / "k.zarr"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntkdist",
            "compute",
            f"{EXAMPLE}:factory",
            "--x1",
            f"{tmp_path / 'digits.npz'}:x",
            "--out",
            str(out),
            "--output",
            "trace",
            "--tile",
            "32",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ntkdist.open" in proc.stdout + proc.stderr
    store = ntkdist.open(out)
    assert store.complete
    fn, params = digits_mlp.factory()
    expect = ntkdist.ntk(fn, params, x, output="trace", strategy="jacobian")
    np.testing.assert_allclose(
        store.kernel[:], expect, rtol=2e-4, atol=2e-4 * abs(expect).max()
    )


def _quick_start_commands() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def test_quick_start_leaves_the_clone_clean():
    """Every file the quick start writes lies where .gitignore covers it."""
    commands = _quick_start_commands()
    written = re.findall(r"(\S+\.npz)(?::\w+)?\s|--out\s+(\S+)", commands)
    paths = sorted({a or b for a, b in written})
    assert paths == ["scratch/digits-ntk.zarr", "scratch/digits.npz"]
    ignore = (ROOT / ".gitignore").read_text().split()
    assert "scratch/" in ignore
    if shutil.which("git") and (ROOT / ".git").exists():
        proc = subprocess.run(
            ["git", "check-ignore", "--no-index", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.stdout.split() == paths, proc.stderr


def test_digits_script_writes_into_scratch(tmp_path):
    """``python examples/digits_mlp.py`` with no argument writes scratch/digits.npz."""
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "scratch" / "digits.npz") as data:
        assert data["x"].shape == (1797, 64)
    assert "wrote scratch/digits.npz" in proc.stdout
