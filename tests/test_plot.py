"""``ntkdist plot``: heat-maps of stored kernels, read block by block."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist.plot import kernel_image, plot_kernel

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def _model():
    f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    p = {"w1": jnp.linspace(-1, 1, 12).reshape(3, 4), "w2": jnp.ones((4, 3)) / 2}
    return f, p


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    f, p = _model()
    x = np.random.default_rng(0).normal(size=(40, 3))
    full = ntkdist.compute(
        f, p, x, store=root / "full.zarr", output="full", executor="serial", tile=16
    )
    labels = np.arange(40) % 3
    np.save(root / "y.npy", labels)
    return root, full, labels


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG
    return struct.unpack(">II", head[16:24])


def _cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "ntkdist", "plot", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_plots_a_store(stores):
    root, _, _ = stores
    out = root / "kernel.png"
    proc = _cli(root / "full.zarr", "--out", out, "--labels", root / "y.npy", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "plot saved to" in proc.stdout
    w, h = _png_size(out)
    assert 600 <= w <= 1400 and 500 <= h <= 1200


def test_cli_plots_a_block_of_one_output_pair(stores):
    root, _, _ = stores
    out = root / "block.png"
    proc = _cli(
        root / "full.zarr", "--out", out, "--rows", "4:30", "--cols", "0:20",
        "--out1", "0", "--out2", "2", cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out)[0] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "5:3"], "START < STOP"),
        (["--rows", "abc"], "not a block START:STOP"),
        (["--rows", "0:99"], "not within the kernel's 40 samples"),
        (["--out1", "7"], "out1=7 is not an output index"),
    ],
)
def test_cli_bad_block_is_a_clear_error(stores, args, message):
    root, _, _ = stores
    proc = _cli(root / "full.zarr", "--out", root / "bad.png", *args, cwd=root)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_image_is_the_trace_of_the_block(stores):
    _, store, _ = stores
    k = np.asarray(store.kernel[...])
    img = kernel_image(store, rows=(3, 29), cols=(0, 40), max_size=10)
    assert img.steps == (3, 4)
    np.testing.assert_array_equal(img.rows, np.arange(3, 29, 3))
    expect = np.einsum("ijaa->ij", k[3:29:3, 0:40:4]) / 3
    np.testing.assert_allclose(img.values, expect)
    assert "trace over its 3 outputs" in img.what


def test_image_sorted_by_labels(stores):
    _, store, labels = stores
    img = kernel_image(store, out1=1, labels=labels)
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(img.rows, order)
    np.testing.assert_array_equal(img.cols, order)
    k = np.asarray(store.kernel[...])[:, :, 1, 1]
    np.testing.assert_array_equal(img.values, k[np.ix_(order, order)])
    assert list(img.row_labels[:3]) == [0, 0, 0]


def test_default_subsample_fits_max_size(tmp_path):
    k = np.arange(100.0 * 60).reshape(100, 60)
    img = kernel_image(k, max_size=16)
    assert img.values.shape == (15, 15)  # strides 7 and 4
    path = plot_kernel(k, tmp_path / "k.png", max_size=16)
    assert _png_size(path)[0] > 0


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ntkdist.KernelInputError, match="needs matplotlib"):
        plot_kernel(np.eye(3), tmp_path / "k.png")


def test_unwritten_tiles_plot_grey(tmp_path):
    """An unfinished store's NaN blocks are drawn, not an error or a warning."""
    k = np.random.default_rng(0).random((30, 30))
    k[:10, 20:] = np.nan
    img = kernel_image(k)
    assert np.isnan(img.values[:10, 20:]).all()
    assert _png_size(plot_kernel(k, tmp_path / "k.png"))[0] > 0
    assert _png_size(plot_kernel(np.full((4, 4), np.nan), tmp_path / "n.png"))[0] > 0
