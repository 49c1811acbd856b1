"""The NTK of Flax models (linen and NNX) on digits, through ntkdist's adapters.

Two small untrained networks on scikit-learn's 8x8 digits:

- a linen CNN (``nn.Conv`` → ReLU → ``nn.Dense``), adapted with
  ``ntkdist.adapters.from_flax_linen(module, variables)``;
- an NNX MLP with batch norm in inference mode, adapted with
  ``ntkdist.adapters.from_flax_nnx(model)``; its batch statistics are held
  fixed, only the ``nnx.Param`` leaves are differentiated.

For each, the trace NTK ``K[i, j] = (1/O) Σ_a Θ[i, j, a, a]`` is computed with
``ntkdist.ntk`` and used for the linearised network's ridge prediction
``f0(x) + K(x, X) (K(X, X) + λI)⁻¹ (Y - f0(X))``; the script prints the test
accuracy.

Run: ``python examples/frameworks_flax.py`` (a few seconds on a CPU;
``NTKDIST_EXAMPLE_SMALL=1``: 100 training digits).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, nnx
from sklearn.datasets import load_digits

import ntkdist
from ntkdist.adapters import from_flax_linen, from_flax_nnx

if TYPE_CHECKING:
    from collections.abc import Callable


# NTKDIST_EXAMPLE_SMALL=1 (set by tests/test_examples.py) runs on fewer digits.
SMALL = os.environ.get("NTKDIST_EXAMPLE_SMALL") == "1"


def digits(n_train: int = 200, n_test: int = 100) -> tuple[np.ndarray, ...]:
    """Images ``[n, 8, 8, 1]`` in ``[0, 1]`` and one-hot labels ``[n, 10]``."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = np.eye(10, dtype=np.float32)[data.target]
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def ridge_accuracy(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    ridge: float = 1e-3,
) -> float:
    """Test accuracy of the linearised network's kernel ridge prediction."""
    k_tr = ntkdist.ntk(apply_fn, params, x_tr, output="trace").astype(np.float64)
    k_te = ntkdist.ntk(apply_fn, params, x_te, x_tr, output="trace").astype(np.float64)
    f0_tr = np.asarray(apply_fn(params, x_tr), np.float64)
    f0_te = np.asarray(apply_fn(params, x_te), np.float64)
    scale = np.trace(k_tr) / len(k_tr)
    alpha = np.linalg.solve(k_tr + ridge * scale * np.eye(len(k_tr)), y_tr - f0_tr)
    pred = f0_te + k_te @ alpha
    return float(np.mean(pred.argmax(1) == y_te.argmax(1)))


class CNN(nn.Module):
    """A 3x3 convolution, ReLU, and a dense readout to 10 logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[n, 8, 8, 1] -> [n, 10]``."""
        h = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(h.reshape(h.shape[0], -1))


class MLP(nnx.Module):
    """Dense → batch norm → tanh → dense."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        """Layers for flattened 8x8 images."""
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.norm = nnx.BatchNorm(128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[n, 8, 8, 1] -> [n, 10]``."""
        h = self.hidden(x.reshape(x.shape[0], -1))
        return self.out(jnp.tanh(self.norm(h)))


def main() -> None:
    """Adapt both models, compute their kernels and print the accuracies."""
    x_tr, y_tr, x_te, y_te = digits(*((100, 50) if SMALL else ()))

    module = CNN()
    variables = module.init(jax.random.key(0), x_tr[:1])
    apply_fn, params = from_flax_linen(module, variables)
    start = time.perf_counter()
    acc = ridge_accuracy(apply_fn, params, x_tr, y_tr, x_te, y_te)
    print(
        f"linen CNN: trace-NTK ridge accuracy {acc:.3f} "
        f"({time.perf_counter() - start:.1f} s)"
    )

    model = MLP(nnx.Rngs(0))
    model.eval()  # batch norm uses its running statistics: samples stay independent
    apply_fn, params = from_flax_nnx(model)
    start = time.perf_counter()
    acc = ridge_accuracy(apply_fn, params, x_tr, y_tr, x_te, y_te)
    print(
        f"nnx MLP:   trace-NTK ridge accuracy {acc:.3f} "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
