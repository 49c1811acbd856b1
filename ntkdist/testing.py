"""Reference kernels and assertions for testing strategies and engines.

``reference_ntk`` is deliberately naive and independent of
``ntkdist.kernels``: it builds the whole Jacobian of the whole batch with
``jax.jacrev`` and contracts it with ``einsum``. Use it in float64.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._model import as_model


def reference_ntk(
    apply_fn: Any, params: Any, x1: Any, x2: Any | None = None, output: str = "full"
) -> np.ndarray:
    """Plain Jacobian contraction over whole batches: the ground truth.

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda p, x: x @ p
        >>> reference_ntk(f, jnp.eye(2), jnp.ones((3, 2)), output="trace").shape
        (3, 3)
    """
    model = as_model(apply_fn)
    x1 = jnp.asarray(x1)
    x2 = x1 if x2 is None else jnp.asarray(x2)
    full = _reference_full(model, params, x1, x2)
    return reduce_full(full, output)


@functools.partial(jax.jit, static_argnums=0)
def _reference_full(model: Any, params: Any, x1: jax.Array, x2: jax.Array) -> jax.Array:
    def flat_jac(x: jax.Array) -> jax.Array:
        jac = jax.jacrev(model)(params, x)  # leaves [n, O, *leaf]
        n, o = model(params, x).shape
        return jnp.concatenate(
            [v.reshape(n, o, -1) for v in jax.tree_util.tree_leaves(jac)], axis=-1
        )

    return jnp.einsum("iap,jbp->ijab", flat_jac(x1), flat_jac(x2))


def reduce_full(full: Any, output: str) -> np.ndarray:
    """The ``output`` form of a full kernel ``[N1, N2, O, O]``."""
    full = jnp.asarray(full)
    if output == "full":
        return np.asarray(full)
    if output == "pntk":
        return np.asarray(full.sum(axis=(2, 3)) / full.shape[2])
    diag = jnp.diagonal(full, axis1=2, axis2=3)
    return np.asarray(diag if output == "diagonal" else diag.mean(axis=-1))


def assert_kernel_close(actual: Any, desired: Any, rtol: float = 1e-8) -> None:
    """Relative agreement, scaled by the largest entry of ``desired``.

    Entry-wise rtol alone is unstable for kernels with entries near zero, so
    the tolerance is ``rtol * max|desired|`` for every entry.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    scale = float(np.max(np.abs(desired))) or 1.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale)
