"""Deltas folded through a linear head: the ``trace`` of the last hidden layer.

A dense weight whose output reaches the network's output only through an
elementwise map into one linear head has deltas ``g(x) ⊙ m_o`` with ``m_o``
fixed, so its ``trace`` share contracts over ``F`` instead of ``O·F``. Each case
checks what the analysis finds and the kernel against the float64 ``jacrev``
reference; the cases that must not fold would give a wrong kernel if they did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import ntkdist
from ntkdist._model import Model
from ntkdist.kernels import StructuredDerivatives
from ntkdist.kernels._jit import factor_layout, factors_fn, tile_from_factors
from ntkdist.kernels._structured import analysis_for
from ntkdist.testing import assert_kernel_close, reference_ntk

D, H, OUT = 6, 9, 4


def _params() -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.PRNGKey(3), 8)
    return {
        "w1": jax.random.normal(k[0], (D, H)),
        "b1": jax.random.normal(k[1], (H,)),
        "w2": jax.random.normal(k[2], (H, H)) / 3,
        "b2": jax.random.normal(k[3], (H,)),
        "w3": jax.random.normal(k[4], (H, OUT)),
        "b3": jax.random.normal(k[5], (OUT,)),
        "w4": jax.random.normal(k[6], (H, OUT)),
        "p": jax.random.normal(k[7], (H, H)),
    }


def _hidden(p: Any, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w1"] + p["b1"])


def ntk_param(p: Any, x: jax.Array) -> jax.Array:
    """The stax form: ``(σ/√fan_in)·(h @ W) + σ_b·b``, ReLU as ``maximum``."""
    h = jnp.maximum((1.4 / math.sqrt(D)) * (x @ p["w1"]) + 0.1 * p["b1"], 0.0)
    h = jnp.maximum((1.4 / math.sqrt(H)) * (h @ p["w2"]) + 0.1 * p["b2"], 0.0)
    return (1 / math.sqrt(H)) * (h @ p["w3"]) + 0.1 * p["b3"]


def nn_relu(p: Any, x: jax.Array) -> jax.Array:
    """``jax.nn.relu`` is a ``custom_jvp``: its rule is elementwise."""
    h = jax.nn.relu(_hidden(p, x) @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def gelu_squared(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return (jax.nn.gelu(z) * z) @ p["w3"] * 2.0 - p["b3"]


FOLDS = {"ntk_param": ntk_param, "nn_relu": nn_relu, "gelu_squared": gelu_squared}


@jax.custom_jvp
def mixing(z: jax.Array) -> jax.Array:
    return jnp.tanh(z)


@mixing.defjvp
def _mixing_jvp(primals: Any, tangents: Any) -> Any:
    (z,), (t,) = primals, tangents
    # Not diagonal: every output's tangent sees every input's.
    return jnp.tanh(z), t + jnp.sum(t, axis=-1, keepdims=True)


def skip_to_output(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return jnp.tanh(z) @ p["w3"] + jnp.sum(z, axis=-1, keepdims=True)


def two_heads(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return jnp.tanh(z) @ p["w3"] + jnp.sin(z) @ p["w4"]


def nonlinear_head(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return jnp.tanh(jnp.tanh(z) @ p["w3"])


def data_scaled_head(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return (jnp.tanh(z) @ p["w3"]) * jnp.sum(x, axis=-1, keepdims=True)


def mixed_before_head(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    return jnp.tanh(z @ p["p"]) @ p["w3"]  # a data-dependent, non-diagonal map


def normalised(p: Any, x: jax.Array) -> jax.Array:
    z = _hidden(p, x) @ p["w2"]
    z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-3)
    return z @ p["w3"]


def custom_mixing(p: Any, x: jax.Array) -> jax.Array:
    return mixing(_hidden(p, x) @ p["w2"]) @ p["w3"]


NO_FOLD = {
    "skip_to_output": skip_to_output,
    "two_heads": two_heads,
    "nonlinear_head": nonlinear_head,
    "data_scaled_head": data_scaled_head,
    "mixed_before_head": mixed_before_head,
    "normalised": normalised,
    "custom_mixing": custom_mixing,
}


def _w2_use(fn: Callable[..., jax.Array], p: Any, x: jax.Array) -> int:
    an = analysis_for(Model(fn), p, x)
    leaves = jax.tree_util.tree_leaves(p)
    w2 = next(k for k, v in enumerate(leaves) if v is p["w2"])
    (u,) = [u.index for u in an.uses if u.leaf == w2]
    return u


def _inputs() -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    return jax.random.normal(k1, (5, D)), jax.random.normal(k2, (4, D))


@pytest.mark.parametrize(
    "name",
    [
        "nn_relu",
        "ntk_param",
        pytest.param("gelu_squared", marks=pytest.mark.slow),
    ],
)
def test_the_last_hidden_layer_folds_into_its_head_and_the_kernel_is_unchanged(name):
    fn, p = FOLDS[name], _params()
    x1, x2 = _inputs()
    heads = dict(analysis_for(Model(fn), p, x1).heads)
    assert _w2_use(fn, p, x1) in heads
    s = StructuredDerivatives()
    groups, _ = s.groups(Model(fn), p, x1, "trace")
    assert [g.head for g in groups if g.head is not None] == [heads[_w2_use(fn, p, x1)]]
    # The engine's separate factor and contraction programs fold: w2's deltas
    # are one vector per sample.
    _, shapes = factor_layout(s, Model(fn), "trace", p, x1)
    assert (x1.shape[0], 1, 1, 1, H) in [shape for shape, _ in shapes]
    for output in ("trace", "full", "diagonal", "pntk"):
        want = reference_ntk(fn, p, x1, x2, output)
        f1, f2 = (factors_fn(s, Model(fn), output, p, x) for x in (x1, x2))
        got = tile_from_factors(s, Model(fn), output, p, f1, f2)
        assert_kernel_close(got, want, rtol=1e-12)
        fused = ntkdist.ntk(fn, p, x1, x2, output=output, strategy="structured")
        assert_kernel_close(fused, want, rtol=1e-12)


def test_an_engine_job_with_a_folded_layer_equals_the_reference(tmp_path):
    p = _params()
    x = jax.random.normal(jax.random.PRNGKey(11), (11, D))
    ntkdist.compute(
        ntk_param,
        p,
        x,
        store=str(tmp_path / "k.zarr"),
        output="trace",
        strategy="structured",
        tile=4,
        executor="serial",
        progress=False,
    )
    got = ntkdist.open(str(tmp_path / "k.zarr")).kernel[...]
    assert_kernel_close(got, reference_ntk(ntk_param, p, x, None, "trace"), rtol=1e-12)


def test_folding_cuts_the_trace_contraction_by_the_output_count(monkeypatch):
    import ntkdist.kernels._structured as structured

    p = _params()
    x1, _ = _inputs()
    s = StructuredDerivatives(mode="gram")
    folded = s.cost(Model(ntk_param), p, x1, 64, 64, "trace").flops
    monkeypatch.setattr(structured, "head_for", lambda *a: None)
    unfolded = s.cost(Model(ntk_param), p, x1, 64, 64, "trace").flops
    # w2's share per pair: 2·H + OUT·(2·H + 2) unfolded, 2·H + (2·H + 2) folded.
    assert unfolded - folded == pytest.approx(64 * 64 * (OUT - 1) * (2.0 * H + 2))


@pytest.mark.parametrize("name", sorted(NO_FOLD))
def test_uses_that_do_not_reach_one_linear_head_elementwise_do_not_fold(name):
    fn, p = NO_FOLD[name], _params()
    x1, x2 = _inputs()
    assert _w2_use(fn, p, x1) not in dict(analysis_for(Model(fn), p, x1).heads)
    got = ntkdist.ntk(fn, p, x1, x2, output="trace", strategy="structured")
    assert_kernel_close(got, reference_ntk(fn, p, x1, x2, "trace"), rtol=1e-12)
