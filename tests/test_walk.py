"""The jaxpr walk behind structured derivatives: what it records, and scans.

A weight used inside ``lax.scan`` is one use with ``steps = length`` (the scan
is never unrolled, so long sequences compile like short ones); weights carried
or scanned over fall back to explicit rows. Every case is checked against the
float64 ``jax.jacrev`` reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import ntkdist
from ntkdist.kernels import StructuredDerivatives
from ntkdist.kernels._structured import analysis_for
from ntkdist.testing import assert_kernel_close, reference_ntk


def rnn(p: Any, x: jax.Array) -> jax.Array:
    def step(h: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["b"])
        return h, h

    h0 = jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype)
    h, hs = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return h @ p["out"] + hs.mean(axis=0) @ p["out"]


def reverse_rnn(p: Any, x: jax.Array) -> jax.Array:
    def step(h: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(h @ p["wh"] + xt @ p["wx"]), h

    h0 = jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype)
    h, _ = lax.scan(step, h0, jnp.swapaxes(x, 0, 1), reverse=True)
    return h @ p["out"]


def nested_scan(p: Any, x: jax.Array) -> jax.Array:
    """An outer scan over chunks of the sequence, an inner scan over each chunk."""
    n, t, d = x.shape
    chunks = jnp.swapaxes(x.reshape(n, 3, t // 3, d), 0, 1)  # [3, n, t/3, d]

    def inner(h: jax.Array, xt: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(h @ p["wh"] + xt @ (p["wx"] / 2.0)), None

    def outer(h: jax.Array, chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
        h, _ = lax.scan(inner, h, jnp.swapaxes(chunk, 0, 1))
        return h, h @ p["out"]

    h0 = jnp.zeros((n, p["wh"].shape[0]), x.dtype)
    _, ys = lax.scan(outer, h0, chunks)
    return ys.sum(axis=0)


def carried_weight(p: Any, x: jax.Array) -> jax.Array:
    """A weight carried through the loop (updated each step): explicit rows."""

    def step(c: Any, _: Any) -> tuple[Any, None]:
        h, w = c
        return (jnp.tanh(h @ w), w * 0.9), None

    (h, _), _ = lax.scan(step, (x @ p["wx"], p["wh"]), None, length=3)
    return h @ p["out"]


def _params(width: int = 5) -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    return {
        "wh": 0.4 * jax.random.normal(k[0], (width, width), jnp.float64),
        "wx": 0.5 * jax.random.normal(k[1], (3, width), jnp.float64),
        "b": 0.1 * jax.random.normal(k[2], (width,), jnp.float64),
        "out": jax.random.normal(k[3], (width, 2), jnp.float64),
    }


def _x(n: int, t: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (n, t, 3), jnp.float64)


@pytest.mark.parametrize(
    "output",
    [
        "full",
        *(
            pytest.param(o, marks=pytest.mark.slow)
            for o in ("trace", "diagonal", "pntk")
        ),
    ],
)
@pytest.mark.parametrize(
    "fn", [rnn, reverse_rnn, nested_scan, carried_weight], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("mode", ["gram", pytest.param("rows", marks=pytest.mark.slow)])
def test_scans_match_reference(fn, mode, output):
    p, x1, x2 = _params(), _x(4, 6, 1), _x(3, 6, 2)
    strategy = StructuredDerivatives(mode=mode)
    want = reference_ntk(fn, p, x1, x2, output=output)
    assert_kernel_close(
        ntkdist.ntk(fn, p, x1, x2, output=output, strategy=strategy), want
    )
    sym = ntkdist.ntk(fn, p, x1, output=output, strategy=strategy)
    assert_kernel_close(sym, reference_ntk(fn, p, x1, output=output))


def test_a_scanned_weight_is_one_use_with_steps():
    p, x = _params(), _x(2, 6, 1)
    an = analysis_for(ntkdist.Model(rnn), p, x)
    wh = sorted(p).index("wh")
    (use,) = [u for u in an.uses if u.leaf == wh]
    assert use.steps == 6
    assert wh not in an.fallback
    nested = analysis_for(ntkdist.Model(nested_scan), p, x)
    assert {u.steps for u in nested.uses if u.leaf == wh} == {6}


def test_a_carried_weight_falls_back_to_explicit_rows():
    p, x = _params(), _x(2, 6, 1)
    an = analysis_for(ntkdist.Model(carried_weight), p, x)
    assert sorted(p).index("wh") in an.fallback


def test_long_scan_is_structured_and_exact():
    """A 1,000-step RNN: one use per weight (no unrolling), exact kernel."""
    p, x1, x2 = _params(4), _x(3, 1000, 1), _x(2, 1000, 2)
    an = analysis_for(ntkdist.Model(rnn), p, x1)
    assert max(u.steps for u in an.uses) == 1000
    assert len(an.jaxpr.jaxpr.eqns) < 100  # the walk kept the scan a scan
    got = ntkdist.ntk(rnn, p, x1, x2, output="trace", strategy="structured")
    assert_kernel_close(got, reference_ntk(rnn, p, x1, x2, output="trace"))


def test_literal_next_to_a_parameter_is_walked():
    """``1.0 + g`` (a Literal operand) used to crash the walk."""

    def f(p: Any, x: jax.Array) -> jax.Array:
        return (jnp.tanh(x @ p["w"]) * (1.0 + p["g"])) @ p["v"]

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {
        "w": jax.random.normal(k[0], (3, 4), jnp.float64),
        "g": jnp.zeros(4, jnp.float64),
        "v": jax.random.normal(k[1], (4, 2), jnp.float64),
    }
    x = jax.random.normal(k[2], (4, 3), jnp.float64)
    an = analysis_for(ntkdist.Model(f), p, x)
    assert sorted(p).index("g") in an.fallback  # an elementwise use: explicit rows
    assert_kernel_close(
        ntkdist.ntk(f, p, x, strategy="structured"), reference_ntk(f, p, x)
    )
