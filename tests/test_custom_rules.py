"""Custom derivative rules, constructs JAX cannot differentiate, and refusals.

The kernel is the derivative a model's author means: a ``custom_vjp`` or
``custom_jvp`` rule wins over the primal. A strategy that cannot handle a model
refuses with a ``ModelError`` that names the construct; ``auto`` then falls
back to one that can, and never returns a different kernel.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntkdist
from ntkdist.kernels import STRATEGIES, NtkVectorProducts, _walk
from ntkdist.kernels._structured import analysis_for
from ntkdist.testing import assert_kernel_close, reference_ntk

STRATS = ["jacobian", "ntvp", "structured", "auto"]


@jax.custom_vjp
def _ste(w: jax.Array) -> jax.Array:
    return jnp.round(w)


_ste.defvjp(lambda w: (jnp.round(w), None), lambda _, g: (g,))


def straight_through(p: Any, x: jax.Array) -> jax.Array:
    """A quantised weight whose gradient is the identity (straight-through)."""
    return jnp.tanh(x @ _ste(3.0 * p["w"])) @ p["v"]


@jax.custom_vjp
def _fixed_point(w: jax.Array, u: jax.Array) -> jax.Array:
    def step(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(c[0] @ w + u), c[1] + 1

    return lax.while_loop(lambda c: c[1] < 60, step, (jnp.zeros_like(u), 0))[0]


def _fp_fwd(w: jax.Array, u: jax.Array) -> tuple[jax.Array, Any]:
    z = _fixed_point(w, u)
    return z, (w, u, z)


def _fp_bwd(res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, u, z = res
    _, vjp = jax.vjp(lambda w, u, z: jnp.tanh(z @ w + u), w, u, z)
    a = g
    for _ in range(60):  # a = g + (∂z'/∂z)ᵀ a: the implicit-function rule
        a = g + vjp(a)[2]
    gw, gu, _ = vjp(a)
    return gw, gu


_fixed_point.defvjp(_fp_fwd, _fp_bwd)


def deq(p: Any, x: jax.Array) -> jax.Array:
    """An implicit layer: a while_loop primal behind a custom_vjp rule."""
    return _fixed_point(p["w"], x @ p["a"]) @ p["v"]


def gain(p: Any, x: jax.Array) -> jax.Array:
    """The ``1 + gain`` norm-gain literal, vector and scalar."""
    h = jnp.tanh(x @ p["a"]) * (1.0 + p["g"])
    return (h @ p["v"]) * (1 + p["s"]) - (2.0 - p["s"])


def unrolled_while(p: Any, x: jax.Array) -> jax.Array:
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(c[0] @ p["w"]), c[1] + 1

    return lax.while_loop(lambda c: c[1] < 3, body, (x, 0))[0] @ p["v"]


def _params() -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.PRNGKey(0), 7)
    return {
        "w": 0.3 * jax.random.normal(k[0], (4, 4), jnp.float64),
        "a": 0.4 * jax.random.normal(k[1], (4, 4), jnp.float64),
        "v": jax.random.normal(k[2], (4, 3), jnp.float64),
        "g": 0.1 * jax.random.normal(k[3], (4,), jnp.float64),
        "s": jnp.asarray(0.2, jnp.float64),
    }


def _inputs() -> tuple[jax.Array, jax.Array]:
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    return (
        jax.random.normal(k[0], (5, 4), jnp.float64),
        jax.random.normal(k[1], (3, 4), jnp.float64),
    )


@pytest.mark.parametrize("output", ["full", "pntk"])
@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("fn", [straight_through, deq, gain], ids=lambda f: f.__name__)
def test_custom_rules_and_literals_match_jacrev(fn, strategy, output):
    p = _params()
    x1, x2 = _inputs()
    got = ntkdist.ntk(fn, p, x1, x2, output=output, strategy=strategy)
    assert_kernel_close(got, reference_ntk(fn, p, x1, x2, output=output))


def test_straight_through_rule_is_not_the_primal():
    """The kernel through the rule differs from the primal's (which is zero):
    a walk that differentiated ``round`` would give a kernel without ``w``."""
    p = _params()
    x1, _ = _inputs()
    with_rule = ntkdist.ntk(straight_through, p, x1, strategy="structured")
    no_w = ntkdist.ntk(
        lambda q, x: straight_through({**q, "w": p["w"]}, x),
        {k: v for k, v in p.items() if k != "w"},
        x1,
        strategy="jacobian",
    )
    assert np.max(np.abs(with_rule - no_w)) > 0.1 * np.max(np.abs(with_rule))


def test_custom_rule_leaves_use_explicit_rows_not_the_primal():
    p = _params()
    x1, _ = _inputs()
    an = analysis_for(ntkdist.Model(straight_through), p, x1)
    w_leaf = sorted(p).index("w")
    assert w_leaf in an.fallback
    assert all(u.leaf != w_leaf for u in an.uses)


def test_constant_shift_keeps_the_chain():
    """``1 + g`` and ``c - s`` stay chains of their leaves (no fallback for the
    shift itself); the weight ``a`` keeps its structured rule."""
    p = _params()
    x1, _ = _inputs()

    def shifted_weight(q: Any, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ (1.0 + q["a"])) @ (2.0 - q["v"])

    an = analysis_for(ntkdist.Model(shifted_weight), p, x1)
    used = {u.leaf for u in an.uses}
    assert {sorted(p).index("a"), sorted(p).index("v")} <= used
    assert not an.fallback & used
    got = ntkdist.ntk(shifted_weight, p, x1, strategy="structured")
    assert_kernel_close(got, reference_ntk(shifted_weight, p, x1))


@pytest.mark.parametrize("strategy", STRATS)
def test_while_loop_over_params_is_a_model_error_with_advice(strategy):
    p = _params()
    x1, _ = _inputs()
    with pytest.raises(ntkdist.ModelError) as err:
        ntkdist.ntk(unrolled_while, p, x1, strategy=strategy)
    msg = str(err.value)
    assert "lax.while_loop at" in msg
    assert re.search(r"test_custom_rules\.py:\d+", msg), msg  # where in the model
    assert "lax.scan" in msg and "custom_vjp" in msg


def test_forward_mode_ntvp_refuses_custom_vjp_naming_it():
    p = _params()
    x1, _ = _inputs()
    with pytest.raises(
        ntkdist.ModelError, match=r"custom_vjp function \(_ste\) at .*straight_through"
    ):
        ntkdist.ntk(straight_through, p, x1, strategy=NtkVectorProducts(mode="forward"))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_ntvp_modes_agree(mode):
    p = _params()
    x1, x2 = _inputs()
    got = ntkdist.ntk(gain, p, x1, x2, strategy=NtkVectorProducts(mode=mode))
    assert_kernel_close(got, reference_ntk(gain, p, x1, x2))


@dataclasses.dataclass(frozen=True)
class _Broken(NtkVectorProducts):
    """A strategy that cannot trace anything, and claims to be the cheapest."""

    name = "broken"

    def factors(self, model, params, x, output):
        raise NotImplementedError("no rule for this model")

    def cost(self, model, params, x, n1, n2, output):
        return ntkdist.kernels.Cost(flops=0.0, bytes=0.0)


def test_auto_falls_back_when_the_cheapest_strategy_cannot_trace(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "broken", _Broken)
    p = _params()
    x1, x2 = _inputs()
    got = ntkdist.ntk(gain, p, x1, x2, output="trace")
    assert_kernel_close(got, reference_ntk(gain, p, x1, x2, output="trace"))
    chosen, _ = ntkdist.kernels.choose(ntkdist.Model(gain), p, x1, 5, 3, "trace", None)
    assert chosen.name != "broken"
    with pytest.raises(ntkdist.ModelError, match="strategy 'broken' cannot compute"):
        ntkdist.ntk(gain, p, x1, strategy=_Broken())


@dataclasses.dataclass(frozen=True)
class _BrokenContract(NtkVectorProducts):
    """Factors that trace, a contraction that cannot, and the cheapest cost."""

    name = "broken_contract"

    def contract(self, model, params, f1, f2, output):
        raise NotImplementedError("no rule for this model")

    def cost(self, model, params, x, n1, n2, output):
        return ntkdist.kernels.Cost(flops=0.0, bytes=0.0)


@pytest.mark.parametrize("broken", [_Broken, _BrokenContract])
def test_plan_and_compute_skip_the_cheapest_strategy_when_it_cannot_trace(
    tmp_path, monkeypatch, broken
):
    """``auto`` plans every strategy but traces support only in cost order:
    a cheapest strategy that fails while planning, or only while tracing a
    whole tile, is passed over for the next."""
    monkeypatch.setitem(STRATEGIES, broken.name, broken)
    p = _params()
    x1, _ = _inputs()
    plan = ntkdist.plan(gain, p, x1, output="trace", tile=2, probe=False)
    assert plan.strategy in ("jacobian", "ntvp", "structured")
    store = ntkdist.compute(
        gain,
        p,
        x1,
        store=str(tmp_path / "k.zarr"),
        output="trace",
        tile=2,
        executor="serial",
        progress=False,
    )
    assert store.plan.strategy == plan.strategy
    assert_kernel_close(
        np.asarray(store.kernel[...]), reference_ntk(gain, p, x1, None, output="trace")
    )


def test_compute_refuses_a_while_loop_before_creating_a_store(tmp_path):
    p = _params()
    x1, _ = _inputs()
    store = tmp_path / "k.zarr"
    for strategy in ("auto", "structured"):
        with pytest.raises(ntkdist.ModelError, match=r"lax\.while_loop at"):
            ntkdist.compute(
                unrolled_while, p, x1, store=str(store), strategy=strategy, tile=4
            )
    assert not store.exists()


def test_compute_through_custom_rules_matches_jacrev(tmp_path):
    p = _params()
    x1, x2 = _inputs()
    kstore = ntkdist.compute(
        deq, p, x1, x2, store=str(tmp_path / "k.zarr"), output="full", tile=2
    )
    got = np.asarray(ntkdist.open(str(tmp_path / "k.zarr")).kernel[...])
    assert kstore is not None
    assert_kernel_close(got, reference_ntk(deq, p, x1, x2))


def test_walk_has_no_custom_call_inlining():
    """The walk's call table holds only calls that are the identity for
    derivatives; custom rules must never be inlined."""
    assert not {"custom_jvp_call", "custom_vjp_call"} & set(_walk._CALLS)


@jax.custom_vjp
def _solve_fp(w: jax.Array, u: jax.Array) -> jax.Array:
    return _fixed_point(w, u)


def _solve_fwd(w: jax.Array, u: jax.Array) -> tuple[jax.Array, Any]:
    z = _fixed_point(w, u)
    return z, (w, u, z)


def _solve_bwd(res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, u, z = res
    _, vjp = jax.vjp(lambda w, u, z: jnp.tanh(z @ w + u), w, u, z)

    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return g + vjp(c[0])[2], c[1] + 1

    a = lax.while_loop(lambda c: c[1] < 60, body, (g, 0))[0]  # adjoint solve
    gw, gu, _ = vjp(a)
    return gw, gu


_solve_fp.defvjp(_solve_fwd, _solve_bwd)


def deq_loop_adjoint(p: Any, x: jax.Array) -> jax.Array:
    return _solve_fp(p["w"], x @ p["a"]) @ p["v"]


def test_a_while_loop_inside_a_rules_backward_pass_refuses_only_ntvp():
    """ntvp differentiates the backward pass, which loops: it refuses, saying
    so; the others apply the rule and are exact, so auto is too."""
    p = _params()
    x1, x2 = _inputs()
    want = reference_ntk(deq_loop_adjoint, p, x1, x2)
    with pytest.raises(ntkdist.ModelError) as err:
        ntkdist.ntk(deq_loop_adjoint, p, x1, x2, strategy="ntvp")
    msg = str(err.value)
    assert "backward pass of a jax.custom_vjp function (_solve_fp)" in msg
    assert "no strategy" not in msg and "'structured' or 'jacobian'" in msg
    for strategy in ("structured", "jacobian", "auto"):
        got = ntkdist.ntk(deq_loop_adjoint, p, x1, x2, strategy=strategy)
        assert_kernel_close(got, want)
