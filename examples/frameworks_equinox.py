"""The NTK of an Equinox model on digits, through ``ntkdist.adapters.from_equinox``.

An untrained ``eqx.nn.MLP`` maps one flattened 8x8 digit to 10 logits.
``from_equinox(model)`` splits it with ``eqx.partition(model,
eqx.is_inexact_array)``: the floating-point arrays become ``params``, and the
returned ``apply_fn`` vmaps the per-sample model over the batch.

The full NTK ``Θ[i, j, a, b]`` of a few samples is printed (how close each
output-space block is to a multiple of the identity), then the trace
NTK is used for the linearised network's ridge prediction on held-out digits.

Run: ``python examples/frameworks_equinox.py`` (a few seconds on a CPU;
``NTKDIST_EXAMPLE_SMALL=1``: 100 training digits).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx
import jax
import numpy as np
from sklearn.datasets import load_digits

import ntkdist
from ntkdist.adapters import from_equinox

# NTKDIST_EXAMPLE_SMALL=1 (set by tests/test_examples.py) runs on fewer digits.
SMALL = os.environ.get("NTKDIST_EXAMPLE_SMALL") == "1"


def digits(n_train: int = 200, n_test: int = 100) -> tuple[np.ndarray, ...]:
    """Flattened images ``[n, 64]`` in ``[0, 1]`` and one-hot labels ``[n, 10]``."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.target]
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def main() -> None:
    """Adapt the model, print a full-kernel block and the ridge accuracy."""
    x_tr, y_tr, x_te, y_te = digits(*((100, 50) if SMALL else ()))
    model = eqx.nn.MLP(64, 10, width_size=256, depth=2, key=jax.random.key(0))
    apply_fn, params = from_equinox(model)

    full = ntkdist.ntk(apply_fn, params, x_tr[:3], output="full")
    block = full[0, 0]
    off = np.abs(block - np.diag(np.diag(block))).sum() / (block.size - len(block))
    print(
        f"full NTK {full.shape}: Θ[0, 0] has mean diagonal "
        f"{np.diag(block).mean():.3f}, mean |off-diagonal| {off:.3f}"
    )

    start = time.perf_counter()
    k_tr = ntkdist.ntk(apply_fn, params, x_tr, output="trace").astype(np.float64)
    k_te = ntkdist.ntk(apply_fn, params, x_te, x_tr, output="trace").astype(np.float64)
    f0_tr = np.asarray(apply_fn(params, x_tr), np.float64)
    f0_te = np.asarray(apply_fn(params, x_te), np.float64)
    ridge = 1e-3 * np.trace(k_tr) / len(k_tr)
    alpha = np.linalg.solve(k_tr + ridge * np.eye(len(k_tr)), y_tr - f0_tr)
    accuracy = np.mean((f0_te + k_te @ alpha).argmax(1) == y_te.argmax(1))
    print(
        f"trace-NTK ridge accuracy {accuracy:.3f} "
        f"({time.perf_counter() - start:.1f} s for both kernels)"
    )


if __name__ == "__main__":
    main()
