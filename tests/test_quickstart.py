"""The README quick start: a file-defined model through the CLI, on worker processes."""

from __future__ import annotations

import os
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
