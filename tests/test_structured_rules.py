"""Float64 checks of the structured strategy's per-layer rules on layouts the zoo
does not reach: strided, padded, dilated, transposed, grouped, 1-D and 3-D
convolutions, and a weight shared between uses of different layouts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntkdist
from ntkdist._model import Model
from ntkdist.kernels import StructuredDerivatives
from ntkdist.testing import assert_kernel_close, reduce_full, reference_ntk

MODES = ["rows", "gram", "auto"]


def _normal(seed: int, shape: tuple[int, ...], scale: float = 0.4) -> jax.Array:
    key = jax.random.PRNGKey(seed)
    return scale * jax.random.normal(key, shape, dtype=jnp.float64)


def conv_strided(p: Any, x: jax.Array) -> jax.Array:
    """NHWC: stride, asymmetric padding, filter and input (transposed) dilation."""
    h = lax.conv_general_dilated(
        x,
        p["c1"],
        (2, 1),
        ((1, 2), (0, 1)),
        lhs_dilation=(1, 2),
        rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jnp.tanh(h + p["b1"])
    h = lax.conv_general_dilated(
        h, p["c2"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sin(h).reshape(h.shape[0], -1) @ p["head"]


def _conv_strided_case() -> tuple[Any, ...]:
    p = {
        "c1": _normal(1, (3, 2, 2, 4)),
        "b1": _normal(2, (4,)),
        "c2": _normal(3, (2, 3, 4, 3)),
        "head": _normal(4, (18, 3)),
    }
    return conv_strided, p, _normal(5, (5, 6, 4, 2), 1.0), _normal(6, (3, 6, 4, 2), 1.0)


def conv_grouped_nchw(p: Any, x: jax.Array) -> jax.Array:
    """NCHW/OIHW and CHWN-style layouts, two groups, stride and dilation."""
    h = lax.conv_general_dilated(
        x,
        p["c1"],
        (1, 2),
        ((1, 1), (2, 0)),
        rhs_dilation=(2, 1),
        feature_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    h = jnp.tanh(h)
    h = lax.conv_general_dilated(
        h,
        p["c2"],
        (1, 1),
        "VALID",
        feature_group_count=3,
        dimension_numbers=("NCHW", "IHWO", "NHWC"),
    )
    return jnp.cos(h).reshape(h.shape[0], -1) @ p["head"]


def _conv_grouped_case() -> tuple[Any, ...]:
    p = {
        "c1": _normal(11, (6, 2, 3, 2)),  # O=6, I=4/2 groups
        "c2": _normal(12, (2, 2, 2, 6)),  # IHWO: I=6/3 groups, O=6
        "head": _normal(13, (2 * 3 * 6, 2)),
    }
    x1, x2 = _normal(14, (4, 4, 5, 6), 1.0), _normal(15, (3, 4, 5, 6), 1.0)
    return conv_grouped_nchw, p, x1, x2


def conv_1d_3d(p: Any, x: jax.Array) -> jax.Array:
    """A 1-D convolution (NWC) feeding a 3-D one (NCDHW) through a reshape."""
    n = x.shape[0]
    h = lax.conv_general_dilated(
        x, p["c1"], (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
    )  # [n, 8, 4]
    h = jnp.tanh(h).transpose(0, 2, 1).reshape(n, 4, 2, 2, 2)
    h = lax.conv_general_dilated(
        h,
        p["c2"],
        (1, 1, 1),
        ((1, 0), (0, 1), (1, 1)),
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
    )
    return jnp.tanh(h).reshape(n, -1) @ p["head"]


def _conv_1d_3d_case() -> tuple[Any, ...]:
    p = {
        "c1": _normal(21, (3, 3, 4)),
        "c2": _normal(22, (3, 4, 2, 2, 2)),
        "head": _normal(23, (3 * 2 * 2 * 3, 2)),
    }
    return conv_1d_3d, p, _normal(24, (4, 16, 3), 1.0), _normal(25, (3, 16, 3), 1.0)


def conv_shared(p: Any, x: jax.Array) -> jax.Array:
    """One kernel used three times: twice as HWIO, once read as HWOI."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jnp.tanh(
        lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
    )
    h = jnp.tanh(
        lax.conv_general_dilated(h, p["w"], (2, 2), "SAME", dimension_numbers=dn)
    )
    h = lax.conv_general_dilated(
        h, p["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWOI", "NHWC")
    )
    return jnp.sin(h).reshape(h.shape[0], -1) @ p["head"]


def _conv_shared_case() -> tuple[Any, ...]:
    p = {"w": _normal(31, (2, 2, 3, 3), 0.6), "head": _normal(32, (2 * 2 * 3, 3))}
    return (
        conv_shared,
        p,
        _normal(33, (4, 5, 5, 3), 1.0),
        _normal(34, (3, 5, 5, 3), 1.0),
    )


def conv_shared_same(p: Any, x: jax.Array) -> jax.Array:
    """One kernel used twice in the same layout (every use takes the same rule)."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jnp.tanh(
        lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
    )
    h = lax.conv_general_dilated(h, p["w"], (2, 2), "SAME", dimension_numbers=dn)
    return jnp.sin(h).reshape(h.shape[0], -1) @ p["head"]


def _conv_shared_same_case() -> tuple[Any, ...]:
    p = {"w": _normal(41, (3, 3, 3, 3), 0.5), "head": _normal(42, (3 * 3 * 3, 2))}
    return (
        conv_shared_same,
        p,
        _normal(43, (4, 5, 5, 3), 1.0),
        _normal(44, (3, 5, 5, 3), 1.0),
    )


def dense_batched(p: Any, x: jax.Array) -> jax.Array:
    """``dot_general`` with the weight on the left, transposed, and batched."""
    h = jnp.tanh(jnp.einsum("oc,ntc->nto", p["w1"], x))  # weight is lhs
    h = jnp.tanh(jnp.einsum("nto,tof->ntf", h, p["w2"]))  # weight batch axis t
    return h.reshape(h.shape[0], -1) @ p["head"]


def _dense_batched_case() -> tuple[Any, ...]:
    p = {
        "w1": _normal(51, (4, 3)),
        "w2": _normal(52, (5, 4, 2)),
        "head": _normal(53, (10, 3)),
    }
    return dense_batched, p, _normal(54, (4, 5, 3), 1.0), _normal(55, (3, 5, 3), 1.0)


CASES = {
    "conv_strided": _conv_strided_case,
    "conv_grouped": _conv_grouped_case,
    "conv_1d_3d": _conv_1d_3d_case,
    "conv_shared": _conv_shared_case,
    "conv_shared_same": _conv_shared_same_case,
    "dense_batched": _dense_batched_case,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    f, p, x1, x2 = CASES[request.param]()
    return f, p, x1, x2, reference_ntk(f, p, x1, x2, "full")


@pytest.mark.parametrize(
    "mode",
    # auto (the default) by default; each rule forced everywhere in the slow run
    [m if m == "auto" else pytest.param(m, marks=pytest.mark.slow) for m in MODES],
)
def test_rules_match_reference(case, mode):
    f, p, x1, x2, full = case
    strategy = StructuredDerivatives(mode=mode)
    for out in ("full", "trace", "pntk"):
        k = ntkdist.ntk(f, p, x1, x2, output=out, strategy=strategy)
        assert_kernel_close(k, reduce_full(full, out), rtol=1e-8)


def test_convolutions_take_rules():
    """Every convolution kernel above gets a rule (no explicit-Jacobian fallback)."""
    for name in ("conv_strided", "conv_grouped", "conv_1d_3d", "conv_shared"):
        f, p, x1, _ = CASES[name]()
        for mode in ("rows", "auto"):
            groups, _ = StructuredDerivatives(mode=mode).groups(Model(f), p, x1, "full")
            paths = [
                jax.tree_util.keystr(k)
                for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]
            ]
            covered = {paths[g.leaf] for g in groups}
            convs = {q for q in paths if q.startswith(("['c", "['w"))}
            assert convs <= covered, (name, mode, convs - covered)


@pytest.mark.parametrize("name", ["conv_shared_same", "dense_batched", "conv_strided"])
def test_gram_in_row_blocks_matches_reference(monkeypatch, name):
    """The gram rule contracted in blocks of tile rows (``lax.map``) is exact."""
    from ntkdist.kernels import _structured

    monkeypatch.setattr(_structured, "_GRAM_BLOCK_BYTES", 1)  # one row per block
    f, p, x1, x2 = CASES[name]()
    full = reference_ntk(f, p, x1, x2, "full")
    strategy = StructuredDerivatives(mode="gram", nominal_tile=17)  # a fresh trace
    for out in ("full", "trace", "diagonal", "pntk"):
        k = ntkdist.ntk(f, p, x1, x2, output=out, strategy=strategy)
        assert_kernel_close(k, reduce_full(full, out), rtol=1e-8)


@pytest.mark.parametrize("b", [1, 2])
def test_full_gram_orders_agree_with_the_plain_contraction(b):
    """Both contraction orders of ``full``'s gram share equal the plain einsum."""
    from ntkdist.kernels._structured import (
        _deltas_first,
        _full_deltas_first,
        _full_positions_first,
    )

    rng = np.random.default_rng(0)
    n1, n2, o, t, c, f = 3, 4, 10, 5, 6, 7
    a1, a2 = (rng.standard_normal((n, b, t, c)) for n in (n1, n2))
    d1, d2 = (rng.standard_normal((n, o, b, t, f)) for n in (n1, n2))
    ga = np.einsum("ibtc,jbuc->ijbtu", a1, a2)
    want = np.einsum("ijbtu,iabtf,jcbuf->iajc", ga, d1, d2)
    for fn in (_full_deltas_first, _full_positions_first):
        got = np.asarray(fn(jnp.asarray(ga), jnp.asarray(d1), jnp.asarray(d2)))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert _deltas_first(10, 16, 16) and not _deltas_first(10, 64, 64)


def _late_conv() -> tuple[Any, jax.Array, jax.Array]:
    """A late convolution: few positions (8×8), many channels (128 → 256)."""

    def f(p, x):
        y = lax.conv_general_dilated(
            x, p, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.mean(y, axis=(1, 2))[:, :10]

    return f, jnp.ones((3, 3, 128, 256)) / 34.0, jnp.ones((2, 8, 8, 128))


def test_a_tile_alone_chooses_rows_or_gram_at_its_own_size():
    """``ntk``/``ntk_fn`` compute one tile: structured's per-weight choice is made
    at that tile's size (harmonic mean of its sides), not the engine's nominal."""
    from ntkdist.kernels._choose import for_tile

    assert for_tile("structured", 16, 16).nominal_tile == 16
    assert for_tile("structured", 8, 24).nominal_tile == 12
    mine = StructuredDerivatives(nominal_tile=3)
    assert for_tile(mine, 16, 16) is mine
    assert for_tile("jacobian", 4, 4).name == "jacobian"
    # A late convolution (few positions, many channels) is gram at 16 but rows
    # at the engine's nominal 256 for output="trace".
    f, w, x = _late_conv()
    model = Model(f)
    (g16,), _ = for_tile("structured", 16, 16).groups(model, w, x, "trace")
    (g256,), _ = StructuredDerivatives().groups(model, w, x, "trace")
    assert g16.gram and not g256.gram


def test_rows_that_hold_more_memory_must_be_clearly_cheaper():
    """At a near tie, a weight keeps the gram rule when its rows would hold more
    bytes per sample (``O·P`` against ``T·(C + O·F)``): ResNet-18's stage-3
    convolutions at a 64-sample trace tile held 13.6 GiB of rows for 1.5 %
    fewer FLOPs."""
    from ntkdist.kernels._structured import ROWS_MARGIN, _group_costs

    f, w, x = _late_conv()
    model = Model(f)
    (g,), _ = StructuredDerivatives(nominal_tile=32).groups(model, w, x, "trace")
    assert g.gram
    gram, rows = _group_costs(g.uses, "trace", 10, 32)
    assert rows < gram <= ROWS_MARGIN * rows  # rows were cheaper, but not clearly
    (far,), _ = StructuredDerivatives(nominal_tile=256).groups(model, w, x, "trace")
    assert not far.gram  # clearly cheaper rows are still taken
    # both rules give the same kernel
    x2 = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 128))
    k_gram = StructuredDerivatives(nominal_tile=32, mode="gram")
    k_rows = StructuredDerivatives(nominal_tile=32, mode="rows")
    a = ntkdist.ntk(f, w, x2, output="trace", strategy=k_gram)
    b = ntkdist.ntk(f, w, x2, output="trace", strategy=k_rows)
    np.testing.assert_allclose(a, b, rtol=1e-9)


@pytest.mark.parametrize("scale", [0.0625, -3.0])
def test_a_bias_added_to_a_scaled_product_folds_into_its_weight(scale):
    """NTK parameterisation, ``c·(x @ W) + s·b`` (stax's and the anchor MLP's
    form): the bias joins its weight's gram rule as the column ``s / c`` instead
    of falling back to explicit Jacobian rows, and the kernel is unchanged."""

    def f(p, x):
        h = jnp.tanh(scale * (x @ p["w1"]) + 0.1 * p["b1"])
        return (h @ p["w2"]) * 0.5 + p["b2"]

    rng = np.random.default_rng(0)
    p = {
        "w1": jnp.asarray(rng.normal(size=(6, 8))),
        "b1": jnp.asarray(rng.normal(size=8)),
        "w2": jnp.asarray(rng.normal(size=(8, 3))),
        "b2": jnp.asarray(rng.normal(size=3)),
    }
    x1 = jnp.asarray(rng.normal(size=(5, 6)))
    x2 = jnp.asarray(rng.normal(size=(4, 6)))
    strategy = StructuredDerivatives(mode="gram")
    groups, fallback = strategy.groups(Model(f), p, x1, "full")
    assert fallback == [] and all(g.bias is not None for g in groups)
    full = reference_ntk(f, p, x1, x2, "full")
    for out in ("full", "trace", "pntk"):
        k = ntkdist.ntk(f, p, x1, x2, output=out, strategy=strategy)
        assert_kernel_close(k, reduce_full(full, out), rtol=1e-10)
