"""Each framework adapter gives the kernel of the same network as a plain function."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist import adapters

D_IN, HIDDEN, D_OUT = 4, 6, 3
EPS = 1e-5  # batch-norm epsilon, the default of linen, nnx and haiku

CASES = [
    ("full", "jacobian"),
    ("full", "structured"),
    ("trace", "jacobian"),
    ("trace", "structured"),
]


@pytest.fixture(scope="module")
def xs():
    k1, k2 = jax.random.split(jax.random.key(7))
    return (
        jax.random.normal(k1, (5, D_IN), jnp.float64),
        jax.random.normal(k2, (3, D_IN), jnp.float64),
    )


def plain_mlp(p, x):
    """Dense -> tanh -> Dense, weights as [in, out]."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def plain_mlp_bn(p, x, mean, var):
    """Dense -> batch norm (running statistics) -> tanh -> Dense."""
    h = x @ p["w1"] + p["b1"]
    h = (h - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["offset"]
    return jnp.tanh(h) @ p["w2"] + p["b2"]


def stats():
    """Non-trivial running statistics, so a dropped state would show."""
    k1, k2 = jax.random.split(jax.random.key(3))
    mean = 0.3 * jax.random.normal(k1, (HIDDEN,), jnp.float64)
    var = 0.5 + jax.random.uniform(k2, (HIDDEN,), jnp.float64)
    return mean, var


def perturb(tree, seed):
    """Move every leaf away from its initial value (batch-norm scale 1, bias 0)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        a + 0.1 * jax.random.normal(k, jnp.shape(a), jnp.float64)
        for a, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def assert_same_kernel(adapted, plain, xs, output, strategy):
    """Equal kernels; full outputs between x1 and x2, trace outputs of x1 with
    itself, so both the cross and the symmetric paths are covered."""
    (apply_a, params_a), (apply_p, params_p) = adapted, plain
    leaves = jax.tree_util.tree_leaves(params_a)
    assert all(leaf.dtype == jnp.float64 for leaf in leaves)
    x2 = xs[1] if output == "full" else None
    got = ntkdist.ntk(apply_a, params_a, xs[0], x2, output=output, strategy=strategy)
    want = ntkdist.ntk(apply_p, params_p, xs[0], x2, output=output, strategy=strategy)
    assert got.dtype == np.float64
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


# -- flax linen ----------------------------------------------------------------


def linen_model():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            h = nn.Dense(HIDDEN, param_dtype=jnp.float64, name="d1")(x)
            h = nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="bn")(h)
            return nn.Dense(D_OUT, param_dtype=jnp.float64, name="d2")(jnp.tanh(h))

    module = MLP()
    variables = module.init(jax.random.key(0), jnp.ones((1, D_IN)), train=False)
    mean, var = stats()
    variables = {
        "params": perturb(variables["params"], 1),
        "batch_stats": {"bn": {"mean": mean, "var": var}},
    }
    return module, variables


def linen_plain(variables):
    p = variables["params"]
    flat = {
        "w1": p["d1"]["kernel"],
        "b1": p["d1"]["bias"],
        "scale": p["bn"]["scale"],
        "offset": p["bn"]["bias"],
        "w2": p["d2"]["kernel"],
        "b2": p["d2"]["bias"],
    }
    bs = variables["batch_stats"]["bn"]
    return (lambda q, x: plain_mlp_bn(q, x, bs["mean"], bs["var"])), flat


@pytest.mark.parametrize(("output", "strategy"), CASES)
def test_flax_linen_kernel_equals_plain(xs, output, strategy):
    module, variables = linen_model()
    adapted = adapters.from_flax_linen(module, variables, apply_kwargs={"train": False})
    assert_same_kernel(adapted, linen_plain(variables), xs, output, strategy)


def test_flax_linen_apply_fn_is_stable_and_tracks_fixed_state():
    module, variables = linen_model()
    kw = {"train": False}
    first, _ = adapters.from_flax_linen(module, variables, apply_kwargs=kw)
    again, _ = adapters.from_flax_linen(module, variables, apply_kwargs=kw)
    assert first is again
    assert ntkdist.Model(first) == ntkdist.Model(again)
    other = {
        **variables,
        "batch_stats": {"bn": {"mean": stats()[0] + 1.0, "var": stats()[1]}},
    }
    moved, _ = adapters.from_flax_linen(module, other, apply_kwargs=kw)
    assert moved is not first
    x = jnp.ones((2, D_IN))
    assert not np.allclose(moved(variables["params"], x), first(variables["params"], x))


def test_flax_linen_mutable_discards_updates(xs):
    module, variables = linen_model()
    apply_fn, params = adapters.from_flax_linen(
        module, variables, mutable=["batch_stats"], apply_kwargs={"train": False}
    )
    fixed, _ = adapters.from_flax_linen(
        module, variables, apply_kwargs={"train": False}
    )
    np.testing.assert_array_equal(apply_fn(params, xs[0]), fixed(params, xs[0]))


def test_flax_linen_rejects_variables_without_params():
    module, variables = linen_model()
    with pytest.raises(ValueError, match="no 'params'"):
        adapters.from_flax_linen(module, {"batch_stats": variables["batch_stats"]})


# -- flax nnx ------------------------------------------------------------------


def nnx_model():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            f64 = {"param_dtype": jnp.float64, "rngs": rngs}
            self.d1 = nnx.Linear(D_IN, HIDDEN, **f64)
            self.bn = nnx.BatchNorm(HIDDEN, epsilon=EPS, **f64)
            self.d2 = nnx.Linear(HIDDEN, D_OUT, **f64)

        def __call__(self, x):
            return self.d2(jnp.tanh(self.bn(self.d1(x))))

    model = MLP(nnx.Rngs(0))
    mean, var = stats()
    # nnx keeps batch statistics in float32; replace them with float64 ones.
    model.bn.mean = nnx.BatchStat(mean)
    model.bn.var = nnx.BatchStat(var)
    for layer in (model.d1, model.d2):
        layer.kernel[...] = perturb(layer.kernel[...], 2)
        layer.bias[...] = perturb(layer.bias[...], 3)
    model.bn.scale[...] = perturb(model.bn.scale[...], 4)
    model.bn.bias[...] = perturb(model.bn.bias[...], 5)
    model.eval()
    return model


def nnx_plain(model):
    flat = {
        "w1": model.d1.kernel[...],
        "b1": model.d1.bias[...],
        "scale": model.bn.scale[...],
        "offset": model.bn.bias[...],
        "w2": model.d2.kernel[...],
        "b2": model.d2.bias[...],
    }
    mean, var = model.bn.mean[...], model.bn.var[...]
    return (lambda q, x: plain_mlp_bn(q, x, mean, var)), flat


@pytest.mark.parametrize(("output", "strategy"), CASES)
def test_flax_nnx_kernel_equals_plain(xs, output, strategy):
    model = nnx_model()
    assert_same_kernel(
        adapters.from_flax_nnx(model), nnx_plain(model), xs, output, strategy
    )


def test_flax_nnx_params_are_the_param_state_only():
    model = nnx_model()
    apply_fn, params = adapters.from_flax_nnx(model)
    # 2 Linear layers (kernel, bias) + batch-norm (scale, bias); no statistics.
    assert len(jax.tree_util.tree_leaves(params)) == 6
    assert adapters.from_flax_nnx(model)[0] is apply_fn


# -- equinox -------------------------------------------------------------------


def equinox_model():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(
        D_IN,
        D_OUT,
        HIDDEN,
        depth=1,
        activation=jnp.tanh,
        key=jax.random.key(0),
        dtype=jnp.float64,
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return eqx.combine(perturb(params, 6), static)


def equinox_plain(model):
    first, last = model.layers
    flat = {
        "w1": first.weight.T,
        "b1": first.bias,
        "w2": last.weight.T,
        "b2": last.bias,
    }
    return plain_mlp, flat


@pytest.mark.parametrize(("output", "strategy"), CASES)
def test_equinox_kernel_equals_plain(xs, output, strategy):
    model = equinox_model()
    assert_same_kernel(
        adapters.from_equinox(model), equinox_plain(model), xs, output, strategy
    )


def test_equinox_apply_fn_is_stable():
    model = equinox_model()
    assert adapters.from_equinox(model)[0] is adapters.from_equinox(model)[0]


# -- haiku ---------------------------------------------------------------------


def haiku_model():
    hk = pytest.importorskip("haiku")

    def forward(x, is_training):
        h = hk.Linear(HIDDEN, name="d1")(x)
        h = hk.BatchNorm(True, True, 0.9, eps=EPS, name="bn")(h, is_training)
        return hk.Linear(D_OUT, name="d2")(jnp.tanh(h))

    net = hk.transform_with_state(forward)
    params, state = net.init(jax.random.key(0), jnp.ones((1, D_IN)), True)
    mean, var = stats()
    state = {
        **state,
        "bn/~/mean_ema": {**state["bn/~/mean_ema"], "average": mean[None]},
        "bn/~/var_ema": {**state["bn/~/var_ema"], "average": var[None]},
    }
    return net, perturb(params, 8), state


def haiku_plain(params, state):
    flat = {
        "w1": params["d1"]["w"],
        "b1": params["d1"]["b"],
        "scale": params["bn"]["scale"][0],
        "offset": params["bn"]["offset"][0],
        "w2": params["d2"]["w"],
        "b2": params["d2"]["b"],
    }
    mean = state["bn/~/mean_ema"]["average"][0]
    var = state["bn/~/var_ema"]["average"][0]
    return (lambda q, x: plain_mlp_bn(q, x, mean, var)), flat


@pytest.mark.parametrize(("output", "strategy"), CASES)
def test_haiku_kernel_equals_plain(xs, output, strategy):
    net, params, state = haiku_model()
    adapted = adapters.from_haiku(
        net, params, state=state, apply_kwargs={"is_training": False}
    )
    assert_same_kernel(adapted, haiku_plain(params, state), xs, output, strategy)


def test_haiku_without_state_or_rng(xs):
    hk = pytest.importorskip("haiku")

    def forward(x):
        h = jnp.tanh(hk.Linear(HIDDEN, name="d1")(x))
        return hk.Linear(D_OUT, name="d2")(h)

    net = hk.without_apply_rng(hk.transform(forward))
    params = perturb(net.init(jax.random.key(1), xs[0]), 9)
    flat = {
        "w1": params["d1"]["w"],
        "b1": params["d1"]["b"],
        "w2": params["d2"]["w"],
        "b2": params["d2"]["b"],
    }
    assert_same_kernel(
        adapters.from_haiku(net, params), (plain_mlp, flat), xs, "trace", "structured"
    )


def test_haiku_state_must_match_transform():
    net, params, state = haiku_model()
    with pytest.raises(TypeError, match="pass state="):
        adapters.from_haiku(net, params)
    hk = pytest.importorskip("haiku")
    stateless = hk.transform(lambda x: hk.Linear(2)(x))
    with pytest.raises(TypeError, match="has no state"):
        adapters.from_haiku(stateless, params, state=state)


# -- stax ----------------------------------------------------------------------


@pytest.mark.parametrize(("output", "strategy"), CASES)
def test_stax_kernel_equals_plain(xs, output, strategy):
    from jax.example_libraries import stax

    init_fn, apply_fn = stax.serial(stax.Dense(HIDDEN), stax.Tanh, stax.Dense(D_OUT))
    _, params = init_fn(jax.random.key(0), (-1, D_IN))
    params = perturb(params, 10)
    (w1, b1), (), (w2, b2) = params
    flat = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    adapted = adapters.from_stax(apply_fn, params)
    assert adapted[0] is apply_fn
    assert_same_kernel(adapted, (plain_mlp, flat), xs, output, strategy)


def test_stax_rejects_the_whole_triple():
    from jax.example_libraries import stax

    layer = stax.serial(stax.Dense(2))
    with pytest.raises(TypeError, match="not the tuple"):
        adapters.from_stax(layer, {"w": jnp.ones(2)})


# -- imports -------------------------------------------------------------------


def test_adapters_import_no_framework():
    code = (
        "import sys, ntkdist, ntkdist.adapters, ntkdist.cluster\n"
        "loaded = {'flax', 'equinox', 'haiku'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
        check=False,
    )
    assert done.returncode == 0, done.stderr
