"""``ntk_fn``: validated and planned once per shape, then only the compiled tile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist.testing import assert_kernel_close, reference_ntk
from tests.test_custom_rules import (
    _inputs,
    _params,
    deq,
    straight_through,
    unrolled_while,
)


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _mlp_params():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return {
        "w1": jax.random.normal(k[0], (4, 6), jnp.float64),
        "w2": jax.random.normal(k[1], (6, 3), jnp.float64),
    }


@pytest.mark.parametrize("output", ["full", "trace", "diagonal", "pntk"])
@pytest.mark.parametrize("strategy", ["auto", "jacobian", "ntvp", "structured"])
def test_matches_reference_and_ntk(strategy, output):
    p = _mlp_params()
    x1, x2 = _inputs()
    fn = ntkdist.ntk_fn(mlp, output=output, strategy=strategy)
    got = fn(p, x1, x2)
    assert isinstance(got, jax.Array)
    assert_kernel_close(got, reference_ntk(mlp, p, x1, x2, output=output))
    sym = np.asarray(fn(p, x1))
    np.testing.assert_array_equal(
        sym, np.asarray(ntkdist.ntk(mlp, p, x1, output=output, strategy=strategy))
    )


def test_second_call_skips_validation_and_planning(monkeypatch):
    p = _mlp_params()
    x1, x2 = _inputs()
    fn = ntkdist.ntk_fn(mlp, output="trace")
    first = fn(p, x1, x2)
    calls = []
    import ntkdist._ntk_fn as mod
    import ntkdist.kernels._choose as choose_mod

    rank, check_model = choose_mod.rank, mod._inputs.check_model

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(choose_mod, "rank", counted("rank", rank))
    monkeypatch.setattr(mod._inputs, "check_model", counted("model", check_model))
    p2 = jax.tree_util.tree_map(lambda v: v * 1.5, p)
    again = fn(p2, x1 + 1.0, x2)  # same shapes: straight to the compiled tile
    assert calls == []
    assert_kernel_close(again, reference_ntk(mlp, p2, x1 + 1.0, x2, output="trace"))
    assert not np.allclose(np.asarray(first), np.asarray(again))
    fn(p, x1[:3], x2)  # a new shape is validated and planned again
    assert calls[:1] == ["model"] and "rank" in calls


def test_validates_on_first_use():
    p = _mlp_params()
    x1, _ = _inputs()
    fn = ntkdist.ntk_fn(mlp)
    with pytest.raises(ntkdist.InputError, match="NaN or inf"):
        fn(p, x1.at[0, 0].set(jnp.nan))
    with pytest.raises(ntkdist.InputError, match="output="):
        ntkdist.ntk_fn(mlp, output="diag")


def test_works_under_jit_and_through_custom_rules():
    p = _params()
    x1, x2 = _inputs()
    for model in (straight_through, deq):
        fn = ntkdist.ntk_fn(model, output="full")
        got = jax.jit(fn)(p, x1, x2)
        assert_kernel_close(got, reference_ntk(model, p, x1, x2))
    with pytest.raises(ntkdist.ModelError, match=r"lax\.while_loop at"):
        ntkdist.ntk_fn(unrolled_while)(p, x1)


def test_memory_budget_accepts_sizes():
    fn = ntkdist.ntk_fn(mlp, output="trace", memory_budget="1GiB")
    x1, _ = _inputs()
    assert fn(_mlp_params(), x1).shape == (5, 5)


def test_ntk_repeats_skip_checks_and_cost_model_but_not_nan_checks():
    """A repeated ``ntk`` call with the same model and shapes reuses what the
    first checked and chose; values are still checked, other models are not
    confused with it."""
    from ntkdist._api import _CHOSEN
    from ntkdist._errors import InputError
    from ntkdist._model import Model

    def f(p, x):
        return jnp.tanh(x @ p)

    def g(p, x):
        return jnp.sin(x @ p)

    p = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))
    k1 = ntkdist.ntk(f, p, x, output="trace")
    k2 = ntkdist.ntk(f, p, x * 2, output="trace")
    keys = _CHOSEN.keys()  # an LRU, not a dict
    assert len([k for k in keys if k[0] == Model(f)]) == 1
    np.testing.assert_allclose(k1, ntkdist.ntk_fn(f, output="trace")(p, x))
    assert not np.allclose(k1, k2)
    with pytest.raises(InputError, match="NaN"):
        ntkdist.ntk(f, p, x.at[2, 1].set(jnp.nan), output="trace")
    kg = ntkdist.ntk(g, p, x, output="trace")
    np.testing.assert_allclose(kg, reference_ntk(g, p, x, x, output="trace"))
