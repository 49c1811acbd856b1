"""Byte sizes: one parser and one formatter behind every entry point."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist import InputError
from ntkdist._units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 2**30),  # binary units
        ("4GB", 4e9),  # decimal units
        ("4G", 4e9),  # a bare letter is decimal, as in dask
        ("512 MiB", 512 * 2**20),  # a space is allowed
        ("1.5kib", 1536),  # units are case-insensitive
        ("1e3", 1000),  # exponents
        ("MB", 1e6),  # a unit alone is one of it
        (1000, 1000.0),  # numbers pass through
        (None, None),  # no budget
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "lots",  # not a size
        "2 GiBs",  # unknown unit
        "",  # nothing
        -1,  # negative
        float("nan"),  # not finite
        [1],  # not a number or string
        True,  # a bool is not a size
    ],
)
def test_parse_bytes_refuses_what_is_not_a_size(bad):
    with pytest.raises(InputError, match=r"memory_budget=.*(not a size|non-negative)"):
        parse_bytes(bad)


def test_parse_bytes_names_the_argument():
    with pytest.raises(InputError, match="cache_bytes='x'"):
        parse_bytes("x", name="cache_bytes")


def test_format_bytes_round_trips_through_parse_bytes():
    for n in (0, 100, 1536, 3 * 2**30, 5 * 2**40):
        assert parse_bytes(format_bytes(n).replace(" ", "")) == pytest.approx(
            n, rel=0.05
        )


def f(p, x):
    return jnp.tanh(x @ p["w"])


P = {"w": jnp.ones((3, 2)) / 3}
X = np.linspace(-1, 1, 12).reshape(4, 3)


def test_every_entry_point_refuses_a_bad_budget_with_the_same_message():
    """``ntk``, ``plan`` and ``kernel_ridge`` parse ``memory_budget`` one way."""
    calls = {
        "ntk": lambda: ntkdist.ntk(f, P, X, output="trace", memory_budget="lots"),
        "plan": lambda: ntkdist.plan(
            f, P, X, output="trace", memory_budget="lots", probe=False
        ),
        "kernel_ridge": lambda: ntkdist.kernel_ridge(
            np.eye(4), np.ones(4), ridge=1.0, memory_budget="lots"
        ),
    }
    messages = set()
    for call in calls.values():
        with pytest.raises(InputError) as info:
            call()
        messages.add(str(info.value))
    assert len(messages) == 1, messages
