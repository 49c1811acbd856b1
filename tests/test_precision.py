"""Matmul precision: applied to every traced product, fingerprinted, validated.

On CPUs every precision computes the same values, so these tests check what
is traced and recorded; ``tests/test_gpu.py`` checks the values on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist import InputError, ResumeMismatchError
from ntkdist._model import as_model
from ntkdist._precision import independence_tolerance, matmul_precision
from ntkdist.kernels import get
from ntkdist.kernels._jit import contract_fn, factors_fn

from .zoo import ZOO


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(3, 8)),
        "b1": rng.normal(size=8),
        "w2": rng.normal(size=(8, 2)) / 3,
    }


def _products(hlo: str) -> list[str]:
    """Every dot_general and convolution line of a StableHLO module."""
    return [
        ln
        for ln in hlo.splitlines()
        if "stablehlo.dot_general" in ln or "stablehlo.convolution" in ln
    ]


@pytest.mark.parametrize("strategy", ["structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("name", ["mlp_relu", "cnn", "attention", "scan"])
def test_every_product_is_traced_at_the_requested_precision(name, strategy):
    # The structured walk caches the model's jaxpr; a jaxpr traced at the
    # backend default once made every later "highest" tile keep the model's
    # own products at TF32 on GPUs.
    apply_fn, p64, x64, _ = ZOO[name]()
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)
    x = jnp.asarray(x64[:3], jnp.float32)
    model = as_model(apply_fn)
    s = get(strategy)
    # Trace once at the default first: the cached walk must not leak into the
    # "highest" trace that follows.
    factors_fn.lower(s, model, "full", p, x).as_text()
    for precision in ("highest", "bfloat16"):
        with matmul_precision(precision):
            f = factors_fn(s, model, "full", p, x)
            texts = [
                factors_fn.lower(s, model, "full", p, x).as_text(),
                contract_fn.lower(s, model, "full", p, f, f).as_text(),
            ]
        products = [ln for t in texts for ln in _products(t)]
        assert products, "no matrix products traced"
        if precision == "highest":
            off = [ln for ln in products if "HIGHEST" not in ln or "DEFAULT" in ln]
            assert not off, f"{len(off)} of {len(products)} products not HIGHEST"
        else:
            assert not [ln for ln in products if "HIGHEST" in ln]


def test_precision_is_validated():
    x = np.ones((3, 3))
    with pytest.raises(InputError, match=r"precision='fp8'.*highest.*tensorfloat32"):
        ntkdist.ntk(mlp, params(), x, precision="fp8")


def test_precision_is_fingerprinted_and_recorded(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3))
    path = tmp_path / "k.zarr"

    def run(**kw):
        return ntkdist.compute(
            mlp,
            params(),
            x,
            store=path,
            output="trace",
            tile=4,
            executor="serial",
            progress=False,
            **kw,
        )

    store = run()
    assert store.attrs["precision"] == "highest"
    before = np.asarray(store.kernel[...])
    with pytest.raises(ResumeMismatchError, match="precision"):
        run(precision="tensorfloat32")
    np.testing.assert_array_equal(np.asarray(ntkdist.open(path).kernel[...]), before)
    other = run(precision="tensorfloat32", overwrite=True)
    assert other.attrs["precision"] == "tensorfloat32"
    # float64 on a CPU: the same values at any precision.
    np.testing.assert_array_equal(np.asarray(other.kernel[...]), before)


def test_reduced_precision_widens_the_independence_check():
    assert independence_tolerance("float64") == 1e-9
    with matmul_precision("highest"):
        assert independence_tolerance("float32") == 1e-4
    with matmul_precision("tensorfloat32"):
        assert independence_tolerance("float32") > 1e-3


def test_cli_precision_flag(tmp_path):
    from ntkdist._cli import main

    (tmp_path / "m.py").write_text(
        "import jax.numpy as jnp, numpy as np\n"
        "def make():\n"
        "    w = np.linspace(-1, 1, 6).reshape(3, 2)\n"
        "    return (lambda p, x: jnp.tanh(x @ p)), w\n"
    )
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(5, 3)))
    rc = main(
        [
            "compute",
            f"{tmp_path / 'm.py'}:make",
            "--x1",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "k.zarr"),
            "--executor",
            "serial",
            "--precision",
            "bfloat16",
            "--quiet",
        ]
    )
    assert rc == 0
    assert ntkdist.open(tmp_path / "k.zarr").attrs["precision"] == "bfloat16"
