"""Bad input fails at the boundary with an error that says what to do."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist import InputError, ModelError, PlanError


def f(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


P = {"w": jnp.ones((3, 4)) / 3, "v": jnp.ones((4, 2)) / 2}
X = np.linspace(-1, 1, 15).reshape(5, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # x1/x2 feature shapes that differ
        ({"x2": np.ones((4, 5))}, InputError, r"x1 has samples of shape \(3,\) but x2"),
        # integer inputs, without the opt-in
        ({"x1": np.ones((5, 3), dtype=np.int32)}, InputError, "integer_inputs=True"),
        # complex inputs
        ({"x1": np.ones((5, 3), dtype=np.complex128)}, InputError, "complex"),
        # empty inputs
        ({"x1": np.ones((0, 3))}, InputError, "empty"),
        # no sample axis
        ({"x1": np.float64(1.0)}, InputError, "leading sample axis"),
        # NaN or inf in inputs
        ({"x1": np.where(X > 0.9, np.nan, X)}, InputError, "NaN or inf"),
        (
            {"x2": np.where(X > 0.9, np.inf, X)},
            InputError,
            r"x2 rows .* hold NaN or inf",
        ),
        # NaN in params
        (
            {"params": {"w": P["w"].at[0, 0].set(jnp.nan), "v": P["v"]}},
            InputError,
            r"params\['w'\] holds NaN",
        ),
        # integer and complex params
        (
            {"params": {"w": jnp.ones((3, 4), jnp.int32), "v": P["v"]}},
            InputError,
            r"params\['w'\] has dtype int32",
        ),
        (
            {"params": {"w": P["w"].astype(jnp.complex128), "v": P["v"]}},
            InputError,
            "complex128",
        ),
        # empty params
        ({"params": {}}, InputError, "no array leaves"),
        # unknown names
        ({"output": "diag"}, InputError, r"output='diag' is not known.*'diagonal'"),
        ({"strategy": "fast"}, InputError, r"strategy='fast' is not known"),
        # apply_fn that fails, returns a scalar, or a tuple
        ({"apply_fn": lambda p, x: x @ p["v"]}, ModelError, "failed on a batch"),
        (
            {"apply_fn": lambda p, x: jnp.sum(f(p, x))},
            ModelError,
            "returned shape \\(\\) for a batch of 2",
        ),
        ({"apply_fn": lambda p, x: (f(p, x), x)}, ModelError, "returned a tuple"),
        (
            {"apply_fn": lambda p, x: f(p, x).T},
            ModelError,
            r"returned shape \(2, 3\) for a batch of 3",
        ),
        # a model that couples samples (batch statistics)
        (
            {"apply_fn": lambda p, x: f(p, x - x.mean(0))},
            ModelError,
            "depends on the other samples",
        ),
        # a memory budget too small for auto
        ({"memory_budget": 10}, PlanError, r"cannot hold one 5×5 tile.*needs"),
        # ... or given as a string that is not a size
        (
            {"memory_budget": "lots"},
            InputError,
            r"memory_budget='lots' is not a size; expected .*'2GiB'",
        ),
        # ... too small, as a string
        ({"memory_budget": "10B"}, PlanError, r"cannot hold one 5×5 tile.*needs"),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    args = {"apply_fn": f, "params": P, "x1": X, "x2": None} | kwargs
    with pytest.raises(error, match=match):
        ntkdist.ntk(
            args.pop("apply_fn"),
            args.pop("params"),
            args.pop("x1"),
            args.pop("x2"),
            **args,
        )


def test_ntk_takes_a_memory_budget_as_a_string():
    as_string = ntkdist.ntk(f, P, X, output="trace", memory_budget="2GiB")
    as_number = ntkdist.ntk(f, P, X, output="trace", memory_budget=2 * 2**30)
    np.testing.assert_array_equal(as_string, as_number)


def test_errors_are_value_errors_for_callers_that_do_not_know_ntkdist():
    with pytest.raises(ValueError, match="output"):
        ntkdist.ntk(f, P, X, output="nope")


def test_checks_can_be_opted_out_of():
    x = np.where(X > 0.9, np.nan, X)
    k = ntkdist.ntk(f, P, x, output="trace", check_finite=False)
    assert np.isnan(k).any() and np.isfinite(k[0, 0])
    coupled = lambda p, x: f(p, x - x.mean(0))
    assert ntkdist.ntk(
        coupled, P, X, output="trace", check_independence=False
    ).shape == (5, 5)
