"""The jaxpr FLOP count that backs the cost models where XLA's misses (GPUs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ntkdist.kernels._flops import jaxpr_flops


def _count(fn, *args):
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def _xla(fn, *args):
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def test_dot_and_conv_count_two_flops_per_multiply_add():
    a, b = jnp.ones((7, 5, 3)), jnp.ones((7, 3, 4))
    batched = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
    assert _count(batched, a, b) == 2 * 7 * 5 * 4 * 3
    x, w = jnp.ones((2, 9, 8, 3)), jnp.ones((3, 3, 3, 16))

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    out = conv(x, w).size
    assert _count(conv, x, w) == 2 * out * 3 * 3 * 3
    grouped = lambda x, w: lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        "VALID",
        feature_group_count=3,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    # each of the 2·7·6·6 outputs sums 3·3 taps of its one input channel
    assert _count(grouped, x, jnp.ones((3, 3, 1, 6))) == 2 * (2 * 7 * 6 * 6) * 9


def test_scan_cond_and_nested_calls():
    m = jnp.ones((6, 6))

    def body(c, _):
        return c @ m, None

    scanned = lambda c: lax.scan(body, c, None, length=5)[0]
    assert _count(scanned, jnp.ones(6)) == 5 * 2 * 36
    branchy = lambda p, c: lax.cond(p, lambda c: c @ m @ m, lambda c: c @ m, c)
    # the costlier branch, plus the predicate's conversion
    assert 2 * 2 * 36 <= _count(branchy, True, jnp.ones(6)) <= 2 * 2 * 36 + 2
    nested = jax.jit(lambda c: jax.checkpoint(lambda c: c @ m)(c))
    assert _count(nested, jnp.ones(6)) == 2 * 36


@pytest.mark.parametrize("case", ["resnet18-cifar-w16", "vit-tiny"])
def test_real_networks_count_close_to_xla_on_cpu(case):
    """On CPU, where XLA counts convolutions, the two agree within 20 %."""
    from ntkdist._bench._models import REAL_CASES

    fn, params, shape = REAL_CASES[case]()
    x = jnp.asarray(np.ones((1, *shape)), jnp.float32)
    counted, xla = _count(fn, params, x), _xla(fn, params, x)
    assert 0.8 < counted / xla < 1.25, (counted, xla)
