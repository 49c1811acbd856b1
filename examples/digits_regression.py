"""Kernel regression with the eNTK, its trace and the pNTK of an MLP on digits.

An MLP at initialisation (no training) on scikit-learn's 8x8 digits. Its
empirical NTK is computed through the engine (``ntkdist.compute``) into Zarr
stores in three forms, and kernel ridge regression on one-hot labels is read
from each store:

- ``full``: Θ[i, j, a, b], the (N·O × N·O) kernel;
- ``trace``: (1/O) Σ_a Θ[i, j, a, a], used as K ⊗ I_O;
- ``pntk``: (1/O) Σ_a Σ_b Θ[i, j, a, b], used as K ⊗ I_O (the pNTK).

It prints test accuracy side by side and the relative Frobenius distance
between pNTK ⊗ I_O (and trace ⊗ I_O) and the eNTK on the training set.

Run: ``python examples/digits_regression.py [--train 300] [--width 128]``
(about 20 s on two CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ntkdist
from ntkdist.regression import kernel_ridge, metrics

jax.config.update("jax_enable_x64", True)


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """Standard-parameterisation weights ``N(0, 1/fan_in)``, zero biases."""
    params = []
    for d_in, d_out in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (d_in, d_out), dtype=jnp.float64) / np.sqrt(d_in)
        params.append({"w": w, "b": jnp.zeros(d_out, dtype=jnp.float64)})
    return params


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """A ReLU MLP returning ``[n, 10]`` logits."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def main() -> None:
    """Compute the three kernels, regress, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="training samples")
    parser.add_argument("--test", type=int, default=300, help="test samples")
    parser.add_argument("--width", type=int, default=128, help="hidden width")
    parser.add_argument(
        "--ridge",
        type=float,
        default=1e-3,
        help="ridge, relative to the kernel's mean diagonal",
    )
    parser.add_argument(
        "--executor",
        default="serial",
        choices=("serial", "dask"),
        help="engine executor (dask starts a LocalCluster)",
    )
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=args.train, test_size=args.test, random_state=0, stratify=y
    )
    params = init_mlp(jax.random.PRNGKey(0), [64, args.width, args.width, 10])
    targets = np.eye(10)[y_tr] - 0.1  # centred one-hot, as in neural-tangents' examples

    rows, kernels = [], {}
    with tempfile.TemporaryDirectory(prefix="ntkdist-digits-") as root:
        for output in ("full", "trace", "pntk"):
            start = time.perf_counter()
            kw = {"output": output, "executor": args.executor, "progress": False}
            train = ntkdist.compute(
                mlp, params, x_tr, store=f"{root}/{output}-train", **kw
            )
            cross = ntkdist.compute(
                mlp, params, x_te, x_tr, store=f"{root}/{output}-test", **kw
            )
            t_kernel = time.perf_counter() - start
            src = ntkdist.regression.as_kernel(train)
            ridge = args.ridge * float(src.diagonal().mean())
            start = time.perf_counter()
            fit = kernel_ridge(train, targets, ridge)
            preds = fit.predict(cross)[0]
            t_fit = time.perf_counter() - start
            m = metrics(y_te, preds + 0.1)
            rows.append(
                (output, train.kernel.shape, m["accuracy"], m["mse"], t_kernel, t_fit)
            )
            kernels[output] = np.asarray(train.kernel[...])

    print(
        f"digits: {args.train} train / {args.test} test, MLP 64-{args.width}-"
        f"{args.width}-10 at initialisation, ridge {args.ridge:g} x mean diag"
    )
    print(
        f"{'kernel':<7} {'shape':<20} {'test acc':>8} {'test mse':>9} "
        f"{'kernel s':>9} {'regress s':>9}"
    )
    for output, shape, acc, mse, tk, tf in rows:
        print(
            f"{output:<7} {shape!s:<20} {acc:>8.3f} {mse:>9.4f} {tk:>9.2f} {tf:>9.2f}"
        )

    theta = kernels["full"]
    eye = np.eye(theta.shape[2])
    norm = np.linalg.norm(theta)
    for name in ("pntk", "trace"):
        approx = np.einsum("ij,ab->ijab", kernels[name], eye)
        rel = np.linalg.norm(theta - approx) / norm
        print(
            f"relative Frobenius difference ‖{name} ⊗ I - eNTK‖ / ‖eNTK‖ "
            f"(train x train): {rel:.4f}"
        )


if __name__ == "__main__":
    main()
