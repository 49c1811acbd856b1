"""The NTK of a Haiku model with state on digits, via ``ntkdist.adapters.from_haiku``.

An untrained Haiku MLP with batch norm, built with ``hk.transform_with_state``.
``from_haiku(net, params, state=state, apply_kwargs={"is_training": False})``
holds the batch-norm state fixed (inference mode, so each sample's output
depends on that sample alone) and differentiates the parameters only.

The trace and pseudo-NTK (``output="pntk"``: ``(1/O) Σ_a Σ_b Θ[i, j, a, b]``)
are computed and each is used for the linearised network's ridge prediction on
held-out digits.

Run: ``python examples/frameworks_haiku.py`` (a few seconds on a CPU;
``NTKDIST_EXAMPLE_SMALL=1``: 100 training digits).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import ntkdist
from ntkdist.adapters import from_haiku

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


def forward(x: jax.Array, is_training: bool) -> jax.Array:
    """Dense → batch norm → tanh → dense, ``[n, 64] -> [n, 10]``."""
    h = hk.Linear(256)(x)
    h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(
        h, is_training
    )
    return hk.Linear(10)(jnp.tanh(h))


def main() -> None:
    """Adapt the transform, compute two kernels and print their accuracies."""
    x_tr, y_tr, x_te, y_te = digits(*((100, 50) if SMALL else ()))
    net = hk.transform_with_state(forward)
    params, state = net.init(jax.random.key(0), x_tr, True)
    # One training-mode pass fills the running statistics that inference uses.
    _, state = net.apply(params, state, None, x_tr, True)
    apply_fn, params = from_haiku(
        net, params, state=state, apply_kwargs={"is_training": False}
    )
    f0_tr = np.asarray(apply_fn(params, x_tr), np.float64)
    f0_te = np.asarray(apply_fn(params, x_te), np.float64)
    for output in ("trace", "pntk"):
        start = time.perf_counter()
        k_tr = ntkdist.ntk(apply_fn, params, x_tr, output=output).astype(np.float64)
        k_te = ntkdist.ntk(apply_fn, params, x_te, x_tr, output=output)
        ridge = 1e-3 * np.trace(k_tr) / len(k_tr)
        alpha = np.linalg.solve(k_tr + ridge * np.eye(len(k_tr)), y_tr - f0_tr)
        pred = f0_te + k_te.astype(np.float64) @ alpha
        accuracy = np.mean(pred.argmax(1) == y_te.argmax(1))
        print(
            f"{output:>5}-NTK ridge accuracy {accuracy:.3f} "
            f"({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
