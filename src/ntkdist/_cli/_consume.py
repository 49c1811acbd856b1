"""CLI subcommands of the consumers (``regress``, ``spectrum``).

Parsing and printing only; the work is in :mod:`ntkdist.regression`. Each
subcommand sets ``func`` on its parser: ``args.func(args)`` runs it and returns
the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import zarr

from .._errors import KernelInputError, NtkdistError, StoreError
from ._load import load_input
from ._messages import cli_message


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the consumer subcommands to the ``ntkdist`` parser."""
    reg = subparsers.add_parser(
        "regress",
        help="kernel ridge regression on stored kernels",
        description=(
            "Fit kernel ridge regression on a training kernel for one or more "
            "ridge values, predict from a test x train cross kernel, save the "
            "predictions and print metrics. Kernels are ntkdist stores, zarr "
            "arrays, .npy files or .npz:KEY members; labels are .npy files, "
            ".npz:KEY members or zarr arrays."
        ),
    )
    reg.add_argument(
        "--train-kernel",
        required=True,
        metavar="STORE",
        help="N x N training kernel: an ntkdist store, a zarr array, K.npy or "
        "K.npz:KEY",
    )
    reg.add_argument(
        "--labels",
        required=True,
        metavar="Y",
        help="training labels [N] or [N, C] (integer [N] = class ids): y.npy, "
        "y.npz:KEY or a zarr array",
    )
    reg.add_argument(
        "--cross-kernel",
        required=True,
        metavar="STORE",
        help="test x train kernel (a train x test store is transposed)",
    )
    reg.add_argument(
        "--ridge",
        required=True,
        type=_floats,
        metavar="L1,L2,...",
        help="comma-separated positive ridge values, solved together",
    )
    reg.add_argument(
        "--out",
        required=True,
        metavar="PREDS.npz",
        help="where to save predictions [R, M, C] and fit details",
    )
    reg.add_argument(
        "--test-labels",
        metavar="Y_TEST",
        help="test labels (same forms as --labels): print MSE, R² and (for "
        "classes) accuracy",
    )
    _common(reg)
    reg.add_argument(
        "--tol", type=float, default=1e-6, help="CG relative residual (default 1e-6)"
    )
    reg.add_argument("--maxiter", type=int, default=1000, help="CG iterations")
    reg.add_argument(
        "--preconditioner",
        choices=("nystrom", "block", "jacobi", "none"),
        default="nystrom",
        help="CG preconditioner: nystrom (randomized low-rank Nyström "
        "approximation, the default), block (Cholesky of each diagonal tile), "
        "jacobi (the diagonal) or none",
    )
    reg.add_argument(
        "--method",
        choices=("auto", "cholesky", "cg"),
        default="auto",
        help="solver: cholesky (exact, the kernel in memory), cg (conjugate "
        "gradients, streamed tile by tile), auto (cholesky if twice the kernel "
        "fits --memory-budget, else cg)",
    )
    reg.set_defaults(func=run_regress)

    spec = subparsers.add_parser(
        "spectrum",
        help="top eigenvalues, condition number and decay plot of a kernel",
        description="Eigenvalues of a stored square kernel, read tile by tile.",
    )
    spec.add_argument(
        "store",
        metavar="STORE",
        help="square kernel: an ntkdist store, a zarr array, K.npy or K.npz:KEY",
    )
    spec.add_argument("--k", type=int, default=20, help="how many largest eigenvalues")
    spec.add_argument("--plot", metavar="OUT.png", help="save the eigenvalue decay")
    spec.add_argument("--vectors", metavar="OUT.npy", help="save the eigenvectors")
    spec.add_argument(
        "--method",
        choices=("auto", "dense", "lanczos", "randomized"),
        default="auto",
        help="eigensolver: dense (whole kernel in memory), lanczos (ARPACK) or "
        "randomized (streamed); auto picks dense when twice the kernel fits "
        "--memory-budget, else lanczos",
    )
    spec.add_argument(
        "--no-smallest",
        action="store_true",
        help="skip the smallest eigenvalue and condition number",
    )
    _common(spec)
    spec.set_defaults(func=run_spectrum)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget",
        default="4GiB",
        help="bytes for kernels in memory or streamed blocks",
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="use an unfinished store (unwritten tiles still fail)",
    )


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (e.g. 1e-3,1e-1)"
        ) from err


def load_kernel(path: str, flag: str = "kernel") -> Any:
    """A kernel from a path: an ntkdist store, a zarr array or group, ``.npy``
    or ``.npz:KEY`` (``flag`` names the option in messages)."""
    if path.endswith((".npy", ".npz")) or path.rpartition(":")[0].endswith(".npz"):
        return load_input(path, flag)
    if not os.path.exists(path) and "://" not in path:
        raise KernelInputError(
            f"{flag} {path}: no such kernel store or file (looked at "
            f"{os.path.abspath(path)}); expected an ntkdist store, a zarr array, "
            "K.npy or K.npz:KEY."
        )
    from .._api import open as open_store

    try:
        return open_store(path)
    except StoreError:
        pass
    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node
    if "kernel" in node:
        return node["kernel"]
    raise KernelInputError(
        f"{path} is a zarr group without a 'kernel' array; expected an ntkdist "
        "store, a zarr array or a .npy file."
    )


def _labels(
    path: str, n_classes: int | None, flag: str = "--labels"
) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(load_input(path, flag))
    if raw.ndim == 1 and np.issubdtype(raw.dtype, np.integer):
        k = int(raw.max()) + 1 if n_classes is None else n_classes
        return raw, np.eye(k)[raw]
    return raw, raw.astype(np.float64)


def run_regress(args: argparse.Namespace) -> int:
    """``ntkdist regress``: fit, predict, save, print metrics."""
    from ..regression import kernel_ridge, metrics

    try:
        train = load_kernel(args.train_kernel, "--train-kernel")
        cross = load_kernel(args.cross_kernel, "--cross-kernel")
        out_dim = _width(train)
        _, y = _labels(args.labels, out_dim)
        fit = kernel_ridge(
            train,
            y,
            args.ridge,
            method=args.method,
            memory_budget=args.memory_budget,
            tol=args.tol,
            maxiter=args.maxiter,
            preconditioner=args.preconditioner,
            allow_incomplete=args.allow_incomplete,
        )
        preds = fit.predict(cross, allow_incomplete=args.allow_incomplete)
        test = (
            None
            if args.test_labels is None
            else _labels(args.test_labels, y.shape[1], "--test-labels")[0]
        )
    except NtkdistError as err:
        print(f"ntkdist regress: error: {cli_message(err)}", file=sys.stderr)
        return 2
    np.savez(
        args.out,
        predictions=preds,
        ridges=fit.ridges,
        residuals=fit.residuals,
        method=fit.method,
        iterations=fit.iterations,
    )
    print(
        f"{fit.output} kernel, N={fit.coef.shape[1]}, {fit.method}"
        + (
            f" ({fit.iterations} iterations, {fit.preconditioner} preconditioner)"
            if fit.method == "cg"
            else ""
        )
    )
    for r, ridge in enumerate(fit.ridges):
        line = f"ridge={ridge:g} train_residual={fit.residuals[r].max():.2e}"
        if test is not None:
            for name, value in metrics(test, preds[r]).items():
                line += f" test_{name}={value:.4f}"
        print(line)
    print(f"predictions {preds.shape} saved to {args.out}")
    return 0


def _width(kernel: Any) -> int | None:
    arr = (
        kernel.kernel
        if isinstance(getattr(kernel, "kernel", None), zarr.Array)
        else kernel
    )
    return int(arr.shape[2]) if arr.ndim > 2 else None


def run_spectrum(args: argparse.Namespace) -> int:
    """``ntkdist spectrum``: eigenvalues, condition number, plot."""
    from ..regression import plot_spectrum, spectrum

    try:
        spec = spectrum(
            load_kernel(args.store, "STORE"),
            args.k,
            vectors=args.vectors is not None,
            smallest=not args.no_smallest,
            method=args.method,
            memory_budget=args.memory_budget,
            allow_incomplete=args.allow_incomplete,
        )
        if args.plot:
            plot_spectrum(spec, args.plot)
    except NtkdistError as err:
        print(f"ntkdist spectrum: error: {cli_message(err)}", file=sys.stderr)
        return 2
    print(spec)
    print("eigenvalues:", " ".join(f"{v:.6g}" for v in spec.eigenvalues))
    if args.vectors and spec.eigenvectors is not None:
        np.save(args.vectors, spec.eigenvectors)
        print(f"eigenvectors {spec.eigenvectors.shape} saved to {args.vectors}")
    if args.plot:
        print(f"plot saved to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``regress`` or ``spectrum`` alone (the ``ntkdist`` CLI includes both)."""
    parser = argparse.ArgumentParser(prog="ntkdist")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
