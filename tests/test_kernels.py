"""Every strategy and output form agrees with the plain Jacobian contraction."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist.kernels import StructuredDerivatives
from ntkdist.testing import assert_kernel_close, reduce_full, reference_ntk

from .zoo import ZOO

STRATEGIES = {
    "jacobian": "jacobian",
    "ntvp": "ntvp",
    "structured": "structured",  # per-weight choice of rule
    "structured-gram": StructuredDerivatives(
        mode="gram"
    ),  # gram rule wherever it applies
    "structured-rows": StructuredDerivatives(mode="rows"),  # per-weight Jacobian rows
    "auto": "auto",
}
OUTPUTS = ["full", "trace", "diagonal", "pntk"]


@pytest.fixture(scope="module", params=sorted(ZOO))
def case(request):
    f, p, x1, x2 = ZOO[request.param]()
    full = reference_ntk(f, p, x1, x2, "full")
    refs = {out: reduce_full(full, out) for out in OUTPUTS}
    sym = reference_ntk(f, p, x1, None, "full")
    return f, p, x1, x2, refs, sym


# Each row: a strategy and the outputs checked by default; the slow run checks all
# four outputs of every strategy, symmetric and rectangular.
FAST = {
    "structured": OUTPUTS,  # the default path, every output form
    "structured-gram": ["full", "trace"],  # the gram rule's full and diagonal code
    "structured-rows": ["full", "pntk"],  # per-weight rows with O and with 1 cotangent
    "ntvp": ["full", "pntk"],
    "jacobian": ["diagonal"],
}
SLOW = [pytest.param(s, marks=pytest.mark.slow) for s in sorted(STRATEGIES)]


# The default path runs by default; the other strategies' rows in the slow run.
@pytest.mark.parametrize(
    "strategy",
    [
        s if s == "structured" else pytest.param(s, marks=pytest.mark.slow)
        for s in sorted(FAST)
    ],
)
def test_rectangular_matches_reference(case, strategy):
    f, p, x1, x2, refs, _ = case
    for out in FAST[strategy]:
        k = ntkdist.ntk(
            f, p, x1, x2, output=out, strategy=STRATEGIES[strategy], integer_inputs=True
        )
        assert k.dtype == np.float64
        assert_kernel_close(k, refs[out], rtol=1e-8)


@pytest.mark.parametrize("strategy", SLOW)
def test_every_output_every_strategy(case, strategy):
    f, p, x1, x2, refs, _ = case
    for out in OUTPUTS:
        k = ntkdist.ntk(
            f, p, x1, x2, output=out, strategy=STRATEGIES[strategy], integer_inputs=True
        )
        assert_kernel_close(k, refs[out], rtol=1e-8)


@pytest.mark.parametrize(
    "strategy",
    [
        "structured",
        *(
            pytest.param(s, marks=pytest.mark.slow)
            for s in sorted(STRATEGIES)
            if s != "structured"
        ),
    ],
)
def test_symmetric_is_exact_and_matches(case, strategy):
    f, p, x1, _, _, sym = case
    k = ntkdist.ntk(
        f, p, x1, output="full", strategy=STRATEGIES[strategy], integer_inputs=True
    )
    assert_kernel_close(k, sym, rtol=1e-8)
    np.testing.assert_array_equal(k, k.transpose(1, 0, 3, 2))
    kp = ntkdist.ntk(
        f, p, x1, output="pntk", strategy=STRATEGIES[strategy], integer_inputs=True
    )
    np.testing.assert_array_equal(kp, kp.T)


def test_structured_uses_rules_not_only_fallback():
    """The weights of dense, conv, shared and scanned uses get structured rules."""
    from ntkdist._model import Model

    expect = {  # model -> leaf paths that must be covered by a rule
        "mlp_relu": {"['w1']", "['w2']", "['w3']", "['b1']", "['b2']", "['b3']"},
        "cnn": {"['c1']", "['c2']", "['dense']"},
        "cnn_nchw_grouped": {"['c1']", "['dw']", "['head']"},
        "shared_weight": {"['w']", "['out']"},
        "scan": {"['wh']", "['wx']", "['out']"},
        "checkpoint": {"['w1']", "['w2']", "['w3']"},
        "multihead": {"['wq']", "['wk']", "['wo']"},
    }
    # gram-only: a bias broadcast over a sequence folds into its weight's rule
    f, p, x1, _ = ZOO["seq_dense"]()
    groups, fallback = StructuredDerivatives(mode="gram").groups(
        Model(f), p, jnp.asarray(x1), "full"
    )
    assert {g.bias is not None for g in groups} == {True} and not fallback
    import jax

    for name, leaves in expect.items():
        f, p, x1, _ = ZOO[name]()
        paths = [
            jax.tree_util.keystr(k)
            for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]
        ]
        groups, _ = StructuredDerivatives().groups(Model(f), p, jnp.asarray(x1), "full")
        covered = {paths[g.leaf] for g in groups}
        covered |= {paths[g.bias.leaf] for g in groups if g.bias is not None}
        assert leaves <= covered, (name, leaves - covered)
