"""Exact identities of the eNTK, and convergence to the infinite-width NTK."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkdist
from ntkdist.testing import assert_kernel_close

from .zoo import ZOO

MODELS = ["mlp_relu", "cnn", "attention", "scan"]


@pytest.mark.parametrize(
    "name",
    # two models by default, every model in the slow run
    [
        m if m in ("mlp_relu", "cnn") else pytest.param(m, marks=pytest.mark.slow)
        for m in MODELS
    ],
)
def test_psd_symmetric_and_pntk_two_ways(name):
    f, p, x1, _ = ZOO[name]()
    full = ntkdist.ntk(f, p, x1, output="full", strategy="structured")
    n, _, o, _ = full.shape
    mat = full.transpose(0, 2, 1, 3).reshape(n * o, n * o)
    np.testing.assert_array_equal(mat, mat.T)
    eig = np.linalg.eigvalsh(mat)
    assert eig.min() > -1e-10 * eig.max()
    pntk = ntkdist.ntk(f, p, x1, output="pntk", strategy="structured")
    assert_kernel_close(pntk, full.sum(axis=(2, 3)) / o, rtol=1e-10)
    trace = ntkdist.ntk(f, p, x1, output="trace", strategy="structured")
    assert_kernel_close(trace, np.einsum("ijaa->ij", full) / o, rtol=1e-10)


@pytest.mark.parametrize(
    "name",
    [
        "mlp_relu",
        pytest.param("resnet_layernorm", marks=pytest.mark.slow),
        pytest.param("shared_weight", marks=pytest.mark.slow),
    ],
)
def test_additive_over_parameter_leaves(name):
    """Θ = Σ_leaves J_leaf J_leafᵀ: the kernel of each leaf alone adds up."""
    f, p, x1, x2 = ZOO[name]()
    leaves, treedef = jax.tree_util.tree_flatten(p)
    total = ntkdist.ntk(f, p, x1, x2, output="full", strategy="structured")
    parts = []
    for k in range(len(leaves)):

        def only_k(leaf, x, k=k):
            lv = list(leaves)
            lv[k] = leaf
            return f(jax.tree_util.tree_unflatten(treedef, lv), x)

        parts.append(
            ntkdist.ntk(only_k, leaves[k], x1, x2, output="full", strategy="structured")
        )
    assert_kernel_close(sum(parts), total, rtol=1e-10)


# -- infinite width ----------------------------------------------------------


def _relu_expectations(s12, s11, s22):
    """E[relu(u) relu(v)] and E[relu'(u) relu'(v)] for (u, v) ~ N(0, Σ)."""
    norm = np.sqrt(s11 * s22)
    cos = np.clip(s12 / norm, -1.0, 1.0)
    theta = np.arccos(cos)
    nngp = norm * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    return nngp, (np.pi - theta) / (2 * np.pi)


def infinite_width_ntk(x, depth):
    """Arc-cosine recursion (Jacot et al. 2018) for the NTK-parameterised ReLU MLP."""
    x = np.asarray(x)
    sigma = x @ x.T / x.shape[1]
    theta = sigma
    for _ in range(depth):
        d = np.diag(sigma)
        sigma, sigma_dot = _relu_expectations(sigma, d[:, None], d[None, :])
        theta = theta * sigma_dot + sigma
    return theta


def ensemble_mlp(p, x):
    """``S`` independent NTK-parameterised ReLU MLPs, outputs summed / √S.

    The eNTK of this sum is exactly the average of the ``S`` networks' eNTKs,
    so one kernel gives the average over ``S`` seeds.
    """
    h = jnp.einsum("nd,sdw->nsw", x, p[0]) / jnp.sqrt(x.shape[1])
    for w in p[1:]:
        h = jnp.einsum("nsw,swv->nsv", jax.nn.relu(h), w) / jnp.sqrt(h.shape[-1])
    return h.sum(axis=1) / jnp.sqrt(h.shape[1])


@pytest.mark.slow
def test_wide_relu_mlp_converges_to_infinite_width_ntk():
    x = jax.random.normal(jax.random.PRNGKey(42), (12, 8), dtype=jnp.float64)
    depth, seeds, outputs = 2, 64, 10
    ref = infinite_width_ntk(x, depth)
    errors = {}
    for width in (64, 256, 1024):
        dims = [8] + [width] * depth + [outputs]
        keys = jax.random.split(jax.random.PRNGKey(width), depth + 1)
        p = [
            jax.random.normal(k, (seeds, a, b), dtype=jnp.float64)
            for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
        ]
        k = ntkdist.ntk(ensemble_mlp, p, x, output="trace", strategy="structured")
        errors[width] = np.linalg.norm(k - ref) / np.linalg.norm(ref)
    assert errors[256] < 2e-2, errors
    assert errors[1024] < errors[256] < errors[64], errors
