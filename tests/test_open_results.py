"""A store opens as labelled data with plain xarray (Zarr v3 dimension names)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist

xr = pytest.importorskip("xarray")


def _model():
    f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    p = {"w1": jnp.ones((3, 4)) / 2, "w2": jnp.ones((4, 2)) / 2}
    return f, p


@pytest.mark.parametrize(
    ("output", "symmetric", "dims"),
    [
        ("full", True, ("x1", "x2", "out1", "out2")),
        ("full", False, ("x1", "x2", "out1", "out2")),
        ("trace", True, ("x1", "x2")),
        ("diagonal", False, ("x1", "x2", "out")),
        ("pntk", False, ("x1", "x2")),
    ],
)
def test_xarray_opens_the_store(tmp_path, output, symmetric, dims):
    f, p = _model()
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(7, 3))
    x2 = None if symmetric else rng.normal(size=(5, 3))
    store = ntkdist.compute(
        f,
        p,
        x1,
        x2,
        store=tmp_path / "k.zarr",
        output=output,
        executor="serial",
        tile=4,
    )
    ds = xr.open_zarr(store.path, consolidated=False)
    assert ds["kernel"].dims == dims
    assert ds.sizes["x1"] == 7 and ds.sizes["x2"] == (7 if symmetric else 5)
    np.testing.assert_array_equal(ds["kernel"].values, store.kernel[...])
    assert ds["done"].dims == ("tile1", "tile2")
    assert ds.attrs["ntkdist"]["output"] == output

    inputs = xr.open_zarr(store.path, group="inputs", consolidated=False)
    assert inputs["x1"].dims == ("x1", "x1_feature_0")
    np.testing.assert_array_equal(inputs["x1"].values, x1)
    if not symmetric:
        np.testing.assert_array_equal(inputs["x2"].values, x2)
    tree = xr.open_datatree(store.path, engine="zarr", consolidated=False)
    assert tree["inputs"].sizes["x1"] == 7


def test_factor_arrays_have_dimension_names(tmp_path):
    from ntkdist.storage._factors import create_factor_store

    f, p = _model()
    store = ntkdist.compute(
        f, p, np.ones((3, 3)), store=tmp_path / "k.zarr", executor="serial"
    )
    create_factor_store(store.path, "x1", 2, 10, "float64")
    ds = xr.open_zarr(store.path, group="factors", consolidated=False)
    assert ds["x1"].dims == ("x1_block", "x1_item")
    assert ds["x1_done"].dims == ("x1_block",)


def test_store_without_dimension_names_still_opens(tmp_path):
    """Stores written before dimension names were recorded open as before."""
    f, p = _model()
    x = np.random.default_rng(1).normal(size=(6, 3))
    store = ntkdist.compute(
        f, p, x, store=tmp_path / "k.zarr", output="trace", executor="serial", tile=4
    )
    expect = np.asarray(store.kernel[...])
    for meta in (tmp_path / "k.zarr").rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.pop("dimension_names", None) is not None:
            meta.write_text(json.dumps(doc))
    old = ntkdist.open(tmp_path / "k.zarr")
    assert old.kernel.metadata.dimension_names is None
    assert old.complete
    np.testing.assert_array_equal(old.kernel[...], expect)
    assert not old.check_tiles()[1]
