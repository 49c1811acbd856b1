"""Benchmark: streamed CG against dense Cholesky kernel ridge on one stored kernel.

``python -m ntkdist._regression_bench [--n 20000] [--chunk 1000] [--path DIR]``

Builds (once) a synthetic NTK-like ``trace`` kernel on disk as a chunked,
uncompressed Zarr array with NaN fill (the engine's store layout):
``K = F Fᵀ`` with ``F = relu(X W)/√p`` random ReLU features of Gaussian
inputs, which like an NTK has one dominant eigenvalue and a fast-decaying
spectrum. Labels are ``[N, C]`` smooth functions of ``X``
plus noise. Then, each in a fresh subprocess so peak memory is its own:

- ``stream``: :func:`ntkdist.regression.kernel_ridge` with ``method="cg"``,
  every ridge and label column in one pass over the tiles per iteration,
  within ``--budget`` of kernel blocks;
- ``dense``: the whole kernel read into memory and ``method="cholesky"``.

It prints wall time, peak resident memory (``ru_maxrss``), CG iterations to
the relative residual ``--tol`` per ridge, and the largest relative
difference between the two sets of coefficients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr

from ..regression._ridge import kernel_ridge
from ..regression._source import KernelSource


def build(path: str, n: int, chunk: int, features: int, labels: int, seed: int) -> None:
    """Write the synthetic kernel (chunk row by chunk row) and labels to ``path``."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 64))
    w = r.standard_normal((64, features)) / 8.0
    f = np.maximum(x @ w, 0.0) / np.sqrt(features)
    z = zarr.create_array(
        f"{path}/kernel",
        shape=(n, n),
        chunks=(chunk, chunk),
        dtype="f8",
        fill_value=np.nan,
        compressors=None,  # as the engine's kernel stores: I/O beats compression
        overwrite=True,
    )
    for r0 in range(0, n, chunk):
        z[r0 : r0 + chunk] = f[r0 : r0 + chunk] @ f.T
    y = np.sin(x[:, :labels]) + 0.1 * r.standard_normal((n, labels))
    np.save(f"{path}/labels.npy", y)
    z.attrs["ready"] = True


def worker(
    mode: str, path: str, ridges: list[float], budget: str, tol: float, rank: int
) -> dict[str, object]:
    """Run one solve in this process; returns its figures."""
    z = zarr.open_array(f"{path}/kernel", mode="r")
    y = np.load(f"{path}/labels.npy")
    diag = np.array([z[i, i] for i in range(0, z.shape[0], max(1, z.shape[0] // 200))])
    lam = [float(r * diag.mean()) for r in ridges]
    start = time.perf_counter()
    if mode == "stream":
        # Stores of x2=None jobs are symmetric; so is this kernel: read i <= j tiles.
        source = KernelSource(z, "trace", "train kernel", symmetric=True)
        fit = kernel_ridge(
            source,
            y,
            lam,
            method="cg",
            memory_budget=budget,
            tol=tol,
            rank=rank,
            maxiter=5000,
        )
    else:
        k = np.empty(z.shape)  # read chunk rows into one buffer: no second copy
        for r0 in range(0, z.shape[0], z.chunks[0]):
            k[r0 : r0 + z.chunks[0]] = z[r0 : r0 + z.chunks[0]]
        fit = kernel_ridge(k, y, lam, method="cholesky", memory_budget=2**62)
    seconds = time.perf_counter() - start
    np.save(f"{path}/coef_{mode}.npy", fit.coef)
    return {
        "mode": mode,
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
        ),
        "iterations": fit.iterations,
        "iterations_per_ridge": fit.column_iterations.max(axis=1).tolist(),
        "max_residual": float(fit.residuals.max()),
        "ridges_absolute": lam,
    }


def main(argv: list[str] | None = None) -> int:
    """Build the kernel if needed, run both solves, print the comparison."""
    parser = argparse.ArgumentParser(
        prog="python -m ntkdist._regression_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=20000, help="samples (N·O with O=1)")
    parser.add_argument("--chunk", type=int, default=1000, help="tile side")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--labels", type=int, default=10, help="label columns")
    parser.add_argument(
        "--ridges", default="1e-2,1e-3", help="ridges relative to the mean diagonal"
    )
    parser.add_argument("--budget", default="1GiB", help="streamed block budget")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--rank", type=int, default=300, help="Nyström rank")
    parser.add_argument("--path", default=None, help="directory for the kernel")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--worker", choices=("stream", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ridges = [float(v) for v in args.ridges.split(",")]
    path = args.path or os.path.join(tempfile.gettempdir(), f"ntkdist-bench-{args.n}")
    if args.worker:
        figures = worker(args.worker, path, ridges, args.budget, args.tol, args.rank)
        print(json.dumps(figures))
        return 0
    os.makedirs(path, exist_ok=True)
    try:
        ready = bool(zarr.open_array(f"{path}/kernel", mode="r").attrs.get("ready"))
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, KeyError):
        ready = False
    if not ready:
        start = time.perf_counter()
        build(path, args.n, args.chunk, args.features, args.labels, seed=0)
        print(
            f"built {args.n} x {args.n} float64 kernel ({8 * args.n**2 / 2**30:.2f} "
            f"GiB) in {time.perf_counter() - start:.1f} s at {path}",
            flush=True,
        )
    results = {}
    for mode in ("stream", *(() if args.skip_dense else ("dense",))):
        cmd = [
            sys.executable,
            "-m",
            "ntkdist._regression_bench",
            "--worker",
            mode,
            "--path",
            path,
            "--ridges",
            args.ridges,
            "--budget",
            args.budget,
            "--tol",
            str(args.tol),
            "--rank",
            str(args.rank),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    if "dense" in results:
        a = np.load(f"{path}/coef_stream.npy")
        b = np.load(f"{path}/coef_dense.npy")
        rel = np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))
        print(
            "relative coefficient difference per ridge (CG vs Cholesky):",
            [f"{v:.2e}" for v in rel],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
