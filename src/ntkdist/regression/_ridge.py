"""Kernel ridge regression on stored NTKs, in memory or streamed tile by tile.

For a training kernel ``K`` (``N × N`` samples), labels ``Y`` and a ridge
``λ > 0``, the dual coefficients are ``α = (K + λ I)⁻¹ Y`` and the prediction
on test inputs is ``K_test_train α``. Conventions per output form:

- ``full`` (``Θ[i, j, a, b]``): ``K`` is the ``(N·O × N·O)`` matrix with row
  index ``i*O + a``; labels are ``[N, O]`` and are flattened the same way.
- ``trace`` / ``pntk`` (``K[i, j]``): the kernel is ``K ⊗ I``; each label
  column is its own scalar regression with the same ``K`` (the pNTK paper's
  construction). Labels are ``[N]`` or ``[N, C]`` for any ``C``.
- ``diagonal`` (``K[i, j, a]``): label column ``a`` is regressed with
  ``K[:, :, a]``; labels are ``[N, O]``.

The ridge is absolute (added to the kernel's diagonal, as in scikit-learn's
``KernelRidge``). All arithmetic is float64 whatever the stored dtype.

Method: ``"cholesky"`` loads the kernel and factors ``K + λ I`` once per ridge;
``"cg"`` runs preconditioned conjugate gradient with every label column and
ridge value advanced together, one pass over the stored tiles per iteration,
never holding more than ``memory_budget`` of kernel blocks; ``"auto"`` picks
Cholesky when twice the float64 kernel fits ``memory_budget``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, final

import numpy as np

from ._linalg import (
    block_jacobi_bytes,
    cg_solve,
    dense_solve,
)
from ._source import (
    KernelInputError,
    KernelSource,
    as_kernel,
    check_square,
    match_cross,
    parse_budget,
)

METHODS = ("auto", "cholesky", "cg")
PRECONDITIONERS = ("nystrom", "block", "jacobi", "none")


def check_ridges(
    ridge: float | Sequence[float], *, allow_zero: bool = False
) -> np.ndarray:
    """Ridge values as a float64 vector; each must be finite and positive.

    Example:
        >>> check_ridges([1e-3, 0.1]).tolist()
        [0.001, 0.1]
    """
    values = np.atleast_1d(np.asarray(ridge, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise KernelInputError(
            f"ridge={ridge!r}; expected a positive number or a non-empty list of them."
        )
    bad = ~np.isfinite(values) | (values < 0 if allow_zero else values <= 0)
    if bad.any():
        need = "non-negative" if allow_zero else "positive"
        raise KernelInputError(
            f"ridge={values.tolist()!r} holds {values[bad].tolist()}; every ridge "
            f"must be finite and {need}: K + λI must be positive definite for the "
            "Cholesky and CG solvers. For ridgeless (interpolating) predictions use "
            "ntkdist.regression.gradient_descent_mse with diag_reg=0 and t=inf."
        )
    return values


def as_labels(y: Any, source: KernelSource, *, name: str = "y_train") -> np.ndarray:
    """Labels as float64 ``[N, C]``, checked against the kernel."""
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    n = source.shape[1]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise KernelInputError(
            f"{name} has shape {np.shape(y)} but {source.name} has {n} samples; "
            f"expected labels [{n}] or [{n}, C] in the kernel's sample order."
        )
    if source.output in ("full", "diagonal") and arr.shape[1] != source.width:
        raise KernelInputError(
            f"{name} has {arr.shape[1]} columns but the {source.output!r} kernel "
            f"{source.name} has O={source.width} outputs; expected [{n}, "
            f"{source.width}] (one column per model output)."
        )
    if not np.isfinite(arr).all():
        raise KernelInputError(f"{name} holds NaN or inf; clean the labels first.")
    return arr


def pack(y: np.ndarray, source: KernelSource, n_ridge: int) -> np.ndarray:
    """Labels ``[N, C]`` repeated per ridge into operator layout ``[N, w, m]``.

    Column order: ridge-major (``k = r*C + c`` for scalar kernels, ``k = r``
    for full and diagonal kernels, where the labels fill the ``w`` axis).
    """
    n, c = y.shape
    if source.width == 1 and source.output != "full":
        return np.ascontiguousarray(np.tile(y, (1, n_ridge)).reshape(n, 1, n_ridge * c))
    return np.ascontiguousarray(np.repeat(y[:, :, None], n_ridge, axis=2))


def unpack(
    x: np.ndarray, source: KernelSource, n_ridge: int, n_cols: int
) -> np.ndarray:
    """Inverse of :func:`pack`: ``[n, w, m]`` to ``[R, n, C]``."""
    n = x.shape[0]
    if source.width == 1 and source.output != "full":
        return x[:, 0, :].reshape(n, n_ridge, n_cols).transpose(1, 0, 2).copy()
    return x.transpose(2, 0, 1).copy()


def _shifts(ridges: np.ndarray, source: KernelSource, n_cols: int) -> np.ndarray:
    if source.width == 1 and source.output != "full":
        return np.repeat(ridges, n_cols)
    return ridges.copy()


@final
@dataclasses.dataclass(frozen=True, eq=False)
class KernelRidgeSolution:
    """Dual coefficients of kernel ridge regression, for every ridge value.

    Attributes:
        coef: ``α[r, i, c]`` for ridge ``ridges[r]``, float64 ``[R, N, C]``.
        ridges: the ridge values, ``[R]``.
        output: the kernel's output form.
        method: ``"cholesky"`` or ``"cg"``.
        iterations: CG iterations (passes over the kernel); 0 for Cholesky.
        preconditioner: the CG preconditioner (``"none"`` for Cholesky).
        residuals: relative residual ``‖Y − (K + λI)α‖ / ‖Y‖`` per ridge and
            label column, ``[R, C]`` (one column for full and diagonal kernels).
        column_iterations: CG iteration at which each of those converged,
            ``[R, C]`` (zeros for Cholesky).
        train: the training kernel (its fingerprint checks cross kernels).
        memory_budget: bytes predictions may hold in kernel blocks.
    """

    coef: np.ndarray
    ridges: np.ndarray
    output: str
    method: str
    iterations: int
    preconditioner: str
    residuals: np.ndarray
    column_iterations: np.ndarray
    train: KernelSource
    memory_budget: int

    def predict(
        self, k_test_train: Any, *, allow_incomplete: bool = False
    ) -> np.ndarray:
        """Predictions ``K_test_train α`` for every ridge, in one pass.

        Args:
            k_test_train: the kernel between test inputs (rows) and the
                training inputs (columns), as array, ``zarr.Array`` or store;
                a store computed train × test is transposed automatically.
            allow_incomplete: accept an unfinished store (NaN still fails).

        Returns:
            float64 ``[R, M, C]``.

        Raises:
            FingerprintMismatchError: the cross kernel's store comes from
                another model, parameters or training set.
        """
        cross = as_kernel(
            k_test_train,
            name="cross kernel",
            output=None,
            allow_incomplete=allow_incomplete,
        )
        cross = match_cross(self.train, cross)
        r, _, c = self.coef.shape
        x = pack_coef(self.coef, self.train)
        out = cross.matmat(x, _block_bytes(self.memory_budget))
        return unpack(out, self.train, r, c)


def pack_coef(coef: np.ndarray, source: KernelSource) -> np.ndarray:
    """``α[R, N, C]`` to operator layout ``[N, w, m]`` (see :func:`pack`)."""
    r, n, c = coef.shape
    if source.width == 1 and source.output != "full":
        return np.ascontiguousarray(coef.transpose(1, 0, 2).reshape(n, 1, r * c))
    return np.ascontiguousarray(coef.transpose(1, 2, 0))


def _block_bytes(budget: int) -> int:
    return max(1, budget // 8)


def kernel_ridge(
    k_train_train: Any,
    y_train: Any,
    ridge: float | Sequence[float],
    *,
    method: str = "auto",
    memory_budget: int | str | None = None,
    tol: float = 1e-6,
    maxiter: int = 1000,
    preconditioner: str = "nystrom",
    rank: int = 300,
    allow_incomplete: bool = False,
) -> KernelRidgeSolution:
    """Fit kernel ridge regression for one or several ridge values at once.

    Args:
        k_train_train: the ``N × N`` training kernel: numpy array, ``zarr.Array``
            or a store from ``ntkdist.open``.
        y_train: labels ``[N]`` or ``[N, C]`` (``[N, O]`` for full and
            diagonal kernels).
        ridge: ``λ > 0`` or a sequence of them; all are solved together.
        method: ``"auto"``, ``"cholesky"`` or ``"cg"``.
        memory_budget: bytes for the kernel in memory (Cholesky needs twice the
            float64 kernel) or for streamed blocks; default ``"4GiB"``.
        tol: CG stops when every column's relative residual is at most this;
            the coefficients' relative error is then at most ``cond(K+λI)·tol``.
        maxiter: most CG iterations (each one pass over the kernel).
        preconditioner: ``"nystrom"`` (randomized Nyström approximation of
            rank ``rank``, one extra pass; suits the fast-decaying spectra of
            NTKs), ``"block"`` (Cholesky of each diagonal tile; falls back to
            ``"jacobi"`` when the factors exceed a quarter of the budget),
            ``"jacobi"`` or ``"none"``.
        rank: the Nyström preconditioner's rank (its ``N·w × rank`` float64
            basis stays in memory).
        allow_incomplete: accept an unfinished store (reading NaN still fails).

    Returns:
        The fitted coefficients; call ``.predict(k_test_train)``.

    Raises:
        KernelInputError: bad kernel, labels, ridge or option.
        IncompleteKernelError: unfinished store, or unwritten tiles read.
        SolverError: not positive definite, or CG did not converge.

    Example:
        >>> import numpy as np
        >>> k = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> fit = kernel_ridge(k, [1.0, -1.0], ridge=1.0)
        >>> np.round(fit.predict(k)[0, :, 0], 3).tolist()
        [0.5, -0.5]
    """
    source = as_kernel(
        k_train_train, name="train kernel", allow_incomplete=allow_incomplete
    )
    check_square(source)
    ridges = check_ridges(ridge)
    y = as_labels(y_train, source)
    return _fit(
        source,
        y,
        ridges,
        method=method,
        memory_budget=memory_budget,
        tol=tol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        rank=rank,
    )


def _fit(
    source: KernelSource,
    y: np.ndarray,
    ridges: np.ndarray,
    *,
    method: str,
    memory_budget: int | str | None,
    tol: float,
    maxiter: int,
    preconditioner: str,
    rank: int = 300,
) -> KernelRidgeSolution:
    if method not in METHODS:
        raise KernelInputError(f"method={method!r}; expected one of {list(METHODS)}.")
    if preconditioner not in PRECONDITIONERS:
        raise KernelInputError(
            f"preconditioner={preconditioner!r}; expected one of "
            f"{list(PRECONDITIONERS)}."
        )
    if not (0 < tol < 1):
        raise KernelInputError(f"tol={tol!r}; expected a relative residual in (0, 1).")
    budget = parse_budget(memory_budget)
    if method == "auto":
        method = "cholesky" if 2 * source.dense_bytes() <= budget else "cg"
    b = pack(y, source, len(ridges))
    shifts = _shifts(ridges, source, y.shape[1])
    if method == "cholesky":
        result = dense_solve(source, b, shifts)
    else:
        if (
            preconditioner == "block"
            and block_jacobi_bytes(source, len(ridges)) > budget // 4
        ):
            preconditioner = "jacobi"
        result = cg_solve(
            source,
            b,
            shifts,
            tol=tol,
            maxiter=maxiter,
            block_bytes=_block_bytes(budget),
            preconditioner=preconditioner,
            rank=rank,
        )
    n_cols = y.shape[1] if source.width == 1 and source.output != "full" else 1
    return KernelRidgeSolution(
        coef=unpack(result.x, source, len(ridges), y.shape[1]),
        ridges=ridges,
        output=source.output,
        method=result.method,
        iterations=result.iterations,
        preconditioner=result.preconditioner,
        residuals=result.residuals.reshape(len(ridges), n_cols),
        column_iterations=result.column_iterations.reshape(len(ridges), n_cols),
        train=source,
        memory_budget=budget,
    )


def r2_score(y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
    """Coefficient of determination, uniform average over columns (as scikit-learn).

    Example:
        >>> r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
        1.0
    """
    yt = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    yp = np.asarray(y_pred, dtype=np.float64).reshape(len(y_true), -1)
    w = np.ones(len(yt)) if sample_weight is None else np.asarray(sample_weight, float)
    mean = np.average(yt, axis=0, weights=w)
    ss_res = np.einsum("i,ij->j", w, (yt - yp) ** 2)
    ss_tot = np.einsum("i,ij->j", w, (yt - mean) ** 2)
    ok = ss_tot > 0
    scores = np.where(
        ok, 1 - ss_res / np.where(ok, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0)
    )
    return float(scores.mean())


def metrics(y_true: Any, y_pred: np.ndarray) -> Mapping[str, float]:
    """MSE, R² and, for one-hot or integer class labels, argmax accuracy."""
    yt = np.asarray(y_true)
    pred = np.asarray(y_pred, dtype=np.float64)
    if yt.ndim == 1 and np.issubdtype(yt.dtype, np.integer) and pred.ndim == 2:
        onehot = np.eye(pred.shape[1])[yt]
        return {
            "mse": float(np.mean((onehot - pred) ** 2)),
            "r2": r2_score(onehot, pred),
            "accuracy": float(np.mean(pred.argmax(1) == yt)),
        }
    yt = yt.astype(np.float64).reshape(pred.shape)
    out = {"mse": float(np.mean((yt - pred) ** 2)), "r2": r2_score(yt, pred)}
    if (
        yt.ndim == 2
        and yt.shape[1] > 1
        and np.all((yt == 0) | (yt == 1))
        and np.all(yt.sum(1) == 1)
    ):
        out["accuracy"] = float(np.mean(pred.argmax(1) == yt.argmax(1)))
    return out
