"""float16 and bfloat16 inputs to a float32 model: the kernel is the derivative of
the model as it computes, so factors are formed in the precision of the op that
consumes them (a float16 input to a float32 matmul is multiplied in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]


def seq(p, x):
    return jnp.tanh(jnp.einsum("ntd,df->ntf", x, p["w1"]) + p["b"]).mean(1) @ p["w2"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("strategy", ["jacobian", "ntvp", "structured", "auto"])
@pytest.mark.parametrize("fn", [mlp, seq], ids=lambda f: f.__name__)
def test_low_precision_inputs_match_the_promoted_kernel(fn, strategy, dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {
        "w1": jax.random.normal(k[0], (48, 64), jnp.float32) / 7,
        "b": jax.random.normal(k[1], (64,), jnp.float32) / 10,
        "w2": jax.random.normal(k[2], (64, 5), jnp.float32) / 8,
    }
    shape = (6, 48) if fn is mlp else (6, 3, 48)
    x = jax.random.normal(k[3], shape, jnp.float32).astype(dtype)
    # The model's own ops promote x to float32; so must every strategy.
    want = ntkdist.ntk(fn, p, x.astype(jnp.float32), output="full", strategy="jacobian")
    got = ntkdist.ntk(fn, p, x, output="full", strategy=strategy)
    assert got.dtype == np.float32
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err < 2e-6, err
