"""A ReLU MLP for scikit-learn's handwritten digits, and the data as .npz.

Used by the README's quick start:

    python examples/digits_mlp.py scratch/digits.npz   # writes x (1797×64), y
    ntkdist compute examples/digits_mlp.py:factory --x1 scratch/digits.npz:x \\
        --out scratch/digits-ntk.zarr --output trace

``factory()`` returns ``(apply_fn, params)``, the form ``ntkdist compute``
expects of a MODEL.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def apply_fn(params, x):
    """NTK-parameterised two-hidden-layer ReLU MLP with biases, 10 outputs."""
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w / jnp.sqrt(h.shape[-1]) + b)
    w, b = params[-1]
    return h @ w / jnp.sqrt(h.shape[-1]) + b


def factory(width: int = 256, seed: int = 0):
    """``(apply_fn, params)`` at initialisation (float32)."""
    dims = [64, width, width, 10]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(dims) - 1)
    params = [
        (jax.random.normal(k, (a, b), jnp.float32), jnp.zeros(b, jnp.float32))
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]
    return apply_fn, params


def load_digits():
    """Digits scaled to [0, 1] and standardised per pixel: ``(x, y)``."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = data.data.astype(np.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x.astype(np.float32), data.target.astype(np.int64)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("scratch", "digits.npz")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    x, y = load_digits()
    np.savez(out, x=x, y=y)
    print(f"wrote {out}: x {x.shape} {x.dtype}, y {y.shape}")
