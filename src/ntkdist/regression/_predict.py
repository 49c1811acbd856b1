"""Linearised-network (NTK-GP) predictions under gradient descent on MSE.

Conventions (those of neural-tangents' ``predict.gradient_descent_mse`` and
``gp_inference``):

- Loss: ``L(f) = 1/(2·N·C) Σ_{i,c} (f_c(x_i) − y_ic)²``, half the mean squared
  error over all ``N·C`` label entries. Gradient flow with learning rate ``η``
  gives ``df/dt = −η Θ ∇_f L``, so the training outputs evolve as
  ``f_t = y + exp(−η t Θ̃ / (N·C)) (f_0 − y)``: the ``1/(N·C)`` normalisation is
  applied (``N·C = y_train.size``), and ``t`` counts steps of size ``η``.
- ``Θ̃ = Θ + ρ I`` with ``ρ = diag_reg`` (absolute) or ``diag_reg ×`` the
  kernel's mean diagonal (``diag_reg_absolute_scale=False``, the default, as
  in neural-tangents).
- Test mean: ``f_t(x*) = f_0(x*) + Θ*X Θ̃⁻¹ (I − exp(−η t Θ̃/(N·C))) (y − f_0)``;
  at ``t = ∞`` the kernel ridge (ridgeless when ``ρ = 0``) prediction.
- Test variance: that of the linearised output when the initial function is a
  centred Gaussian process with covariance ``Θ`` (``Θ̃`` on the training set),
  the NTK-GP of He, Lakshminarayanan & Teh (2020):
  ``Var f_t(x*) = Θ** − Σ_k (Θ*X v_k)² (1 − exp(−2 λ̃_k τ)) / λ̃_k`` with
  ``τ = η t/(N·C)`` and ``(λ̃_k, v_k)`` the eigenpairs of ``Θ̃``. At ``t = ∞`` it
  is ``Θ** − Θ*X Θ̃⁻¹ ΘX*``, neural-tangents' ``gp_inference(get="ntk")``.
- Kernel forms as in :mod:`ntkdist.regression`: ``full`` is the ``N·O``
  matrix, ``trace``/``pntk`` act as ``K ⊗ I_C`` and ``diagonal`` per column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, final

import numpy as np

from ._linalg import _factor, cho_solve, solve_lower
from ._ridge import _fit, as_labels
from ._source import (
    KernelInputError,
    KernelSource,
    as_kernel,
    check_square,
    match_cross,
    parse_budget,
)


class GpPrediction(NamedTuple):
    """Predictions at one training time (a leading time axis when ``t`` is an array).

    Attributes:
        train: training-set outputs ``[N, C]``.
        test: test-set mean ``[M, C]``, or ``None`` without ``k_test_train``.
        test_variance: test-set variance ``[M, C]``, or ``None`` without
            ``k_test_test``.
    """

    train: np.ndarray
    test: np.ndarray | None
    test_variance: np.ndarray | None


def _split(output: str, arr: np.ndarray) -> list[np.ndarray]:
    """``[n, C]`` values to one ``[n_s, c_s]`` block per independent system."""
    if output == "full":
        return [arr.reshape(-1, 1)]
    if output == "diagonal":
        return [arr[:, a : a + 1] for a in range(arr.shape[1])]
    return [arr]


def _join(output: str, parts: list[np.ndarray], n: int) -> np.ndarray:
    if output == "full":
        return parts[0].reshape(n, -1)
    return np.concatenate(parts, axis=1)


def _phi(lam: np.ndarray, tau: float) -> np.ndarray:
    """``expm1(−λτ)/λ``, with its limit ``−τ`` at ``λ = 0``."""
    lam = np.maximum(lam, 0.0)
    safe = np.where(lam > 0, lam, 1.0)
    return np.where(lam > 0, np.expm1(-lam * tau) / safe, -tau)


@final
@dataclasses.dataclass(eq=False)
class MsePredictor:
    """Predictions of the linearised network at any training time.

    Build it with :func:`gradient_descent_mse`; eigendecompositions (finite
    ``t``) and Cholesky factors (variance at ``t = ∞``) are computed on first
    use and kept.
    """

    source: KernelSource
    y: np.ndarray
    learning_rate: float
    reg: float
    budget: int
    _mats: list[np.ndarray] | None = None
    _eig: list[tuple[np.ndarray, np.ndarray]] | None = None
    _chol: list[Any] | None = None

    def _dense(self) -> list[np.ndarray]:
        if self._mats is None:
            need = 3 * self.source.dense_bytes()
            if need > self.budget:
                raise KernelInputError(
                    f"{self.source.name} needs {need / 2**30:.2f} GiB for an in-memory "
                    "eigendecomposition, over memory_budget "
                    f"({self.budget / 2**30:.2f} GiB). Raise memory_budget, or ask "
                    "for the t=inf mean only (it streams through conjugate gradient)."
                )
            self._mats = self.source.dense_matrices()
        return self._mats

    def _eigh(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._eig is None:
            self._eig = []
            for mat in self._dense():
                lam, vec = np.linalg.eigh(mat)
                self._eig.append((lam + self.reg, vec))
        return self._eig

    def __call__(
        self,
        t: float | Any = None,
        k_test_train: Any = None,
        *,
        fx_train_0: Any = 0.0,
        fx_test_0: Any = 0.0,
        k_test_test: Any = None,
        allow_incomplete: bool = False,
    ) -> GpPrediction:
        """Outputs after training time ``t`` (``None`` or ``inf``: converged).

        Args:
            t: training time in steps of the learning rate: a number, ``inf``,
                ``None`` (= ``inf``) or an array (adds a leading axis).
            k_test_train: test × train kernel (array, ``zarr.Array`` or store).
            fx_train_0: network outputs on the training set at ``t = 0``
                (``[N, C]`` or a scalar; 0 gives the mean over initialisations
                of a centred network).
            fx_test_0: the same on the test set.
            k_test_test: the test × test kernel (its diagonal is read) or its
                diagonal alone (``[M]`` for trace/pntk, ``[M, O]`` or
                ``[M, O, O]`` for full, ``[M, O]`` for diagonal); gives the
                variance.
            allow_incomplete: accept unfinished stores (NaN still fails).

        Returns:
            The training outputs, test mean and test variance.
        """
        ts = np.asarray(np.inf if t is None else t, dtype=np.float64)
        if np.any(ts < 0) or np.any(np.isnan(ts)):
            raise KernelInputError(f"t={t!r}; training times must be non-negative.")
        cross = None
        if k_test_train is not None:
            cross = match_cross(
                self.source,
                as_kernel(
                    k_test_train, name="cross kernel", allow_incomplete=allow_incomplete
                ),
            )
        kdiag = None
        if k_test_test is not None:
            if cross is None:
                raise KernelInputError("k_test_test needs k_test_train as well.")
            kdiag = self._test_diag(k_test_test, cross.shape[0], allow_incomplete)
        n, c = self.y.shape
        f0 = np.broadcast_to(np.asarray(fx_train_0, dtype=np.float64), (n, c))
        m = None if cross is None else cross.shape[0]
        g0 = (
            None
            if m is None
            else np.broadcast_to(np.asarray(fx_test_0, dtype=np.float64), (m, c))
        )
        results = [self._at(float(tt), cross, f0, g0, kdiag) for tt in ts.ravel()]
        if ts.ndim == 0:
            return results[0]
        stacked = [
            None
            if parts[0] is None
            else np.stack(parts).reshape(*ts.shape, *parts[0].shape)
            for parts in zip(*results, strict=True)
        ]
        return GpPrediction(*stacked)  # type: ignore[arg-type]

    def _test_diag(self, k: Any, m: int, allow_incomplete: bool) -> np.ndarray:
        src = self.source
        full_ndim = {"full": 4, "diagonal": 3}.get(src.output, 2)
        if not isinstance(k, np.ndarray) or np.ndim(k) == full_ndim:
            test = as_kernel(k, name="test kernel", allow_incomplete=allow_incomplete)
            diag = test.diagonal()
        else:
            diag = np.asarray(k, dtype=np.float64)
            if src.output == "full" and diag.ndim == 3:
                diag = np.diagonal(diag, axis1=1, axis2=2)
            diag = diag.reshape(diag.shape[0], -1)
        if diag.shape[0] != m or diag.shape[1] != src.width:
            raise KernelInputError(
                f"k_test_test gives a diagonal of shape {diag.shape}; expected "
                f"({m}, {src.width}) for {m} test samples of a {src.output!r} kernel."
            )
        return diag

    def _at(
        self,
        t: float,
        cross: KernelSource | None,
        f0: np.ndarray,
        g0: np.ndarray | None,
        kdiag: np.ndarray | None,
    ) -> GpPrediction:
        out = self.source.output
        n = self.y.shape[0]
        if np.isinf(t) and kdiag is None:
            return self._infinite_mean(cross, f0, g0)
        tau = self.learning_rate * t / self.y.size
        cross_mats = None if cross is None else cross.dense_matrices()
        train, test, var = [], [], []
        rhs = _split(out, f0 - self.y)
        for s, mat in enumerate(self._dense()):
            if np.isinf(t):
                train.append(_split(out, np.array(self.y))[s])
                if cross_mats is not None:
                    mean, v = self._inf_system(s, mat, cross_mats[s], rhs[s])
                    test.append(mean)
                    var.append(v)
                continue
            lam, vec = self._eigh()[s]
            q = vec.T @ rhs[s]
            train.append(
                _split(out, f0)[s]
                + vec @ (np.expm1(-np.maximum(lam, 0) * tau)[:, None] * q)
            )
            if cross_mats is not None:
                kv = cross_mats[s] @ vec
                test.append(kv @ (_phi(lam, tau)[:, None] * q))
                var.append(np.einsum("ij,ij,j->i", kv, kv, _phi(lam, 2 * tau)))
        return self._assemble(train, test, var, cross, g0, kdiag, n)

    def _inf_system(
        self, s: int, mat: np.ndarray, kc: np.ndarray, rhs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._chol is None:
            self._chol = [_factor(m, self.reg, self.source.name) for m in self._dense()]
        fac = self._chol[s]
        mean = -kc @ cho_solve(fac[0], rhs)
        half = solve_lower(fac[0], kc.T)
        return mean, -np.einsum("ij,ij->j", half, half)

    def _assemble(
        self,
        train: list[np.ndarray],
        test: list[np.ndarray],
        var: list[np.ndarray],
        cross: KernelSource | None,
        g0: np.ndarray | None,
        kdiag: np.ndarray | None,
        n: int,
    ) -> GpPrediction:
        out = self.source.output
        c = self.y.shape[1]
        if cross is None or g0 is None:
            return GpPrediction(_join(out, train, n), None, None)
        m = cross.shape[0]
        mean = g0 + _join(out, test, m)
        variance = None
        if kdiag is not None:
            drop = _join(out, [v[:, None] for v in var], m)
            variance = np.broadcast_to(kdiag + drop, (m, c)).copy()
        return GpPrediction(_join(out, train, n), mean, variance)

    def _infinite_mean(
        self, cross: KernelSource | None, f0: np.ndarray, g0: np.ndarray | None
    ) -> GpPrediction:
        train = np.array(self.y)
        if cross is None or g0 is None:
            return GpPrediction(train, None, None)
        fit = _fit(
            self.source,
            self.y - f0,
            np.array([self.reg]),
            method="auto",
            memory_budget=self.budget,
            tol=1e-10,
            maxiter=10_000,
            preconditioner="nystrom",
        )
        return GpPrediction(train, g0 + fit.predict(cross)[0], None)


def gradient_descent_mse(
    k_train_train: Any,
    y_train: Any,
    *,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    memory_budget: int | str | None = None,
    allow_incomplete: bool = False,
) -> MsePredictor:
    """Predict the linearised network trained by gradient flow on MSE.

    The conventions (loss normalisation, time units, regularisation, the
    variance's prior) are in this module's docstring; they are those of
    neural-tangents' ``predict.gradient_descent_mse`` and ``gp_inference``.

    Args:
        k_train_train: the training NTK (array, ``zarr.Array`` or store).
        y_train: labels ``[N]`` or ``[N, C]`` (``[N, O]`` for full and diagonal).
        learning_rate: ``η``; time ``t`` is measured in steps of it.
        diag_reg: ``ρ ≥ 0`` added to the training kernel's diagonal.
        diag_reg_absolute_scale: ``ρ = diag_reg`` if true, else
            ``diag_reg × mean(diag K)``.
        memory_budget: bytes for in-memory eigendecomposition (needs about
            three times the float64 kernel); default ``"4GiB"``.
        allow_incomplete: accept an unfinished store (NaN still fails).

    Returns:
        A predictor; call it with ``t`` and the test kernels.

    Example:
        >>> import numpy as np
        >>> k = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> predict = gradient_descent_mse(k, [1.0, -1.0])
        >>> np.round(predict(np.inf, k).test[:, 0], 6).tolist()
        [1.0, -1.0]
    """
    source = as_kernel(
        k_train_train, name="train kernel", allow_incomplete=allow_incomplete
    )
    check_square(source)
    y = as_labels(y_train, source)
    if not np.isfinite(diag_reg) or diag_reg < 0:
        raise KernelInputError(f"diag_reg={diag_reg!r}; expected a number ≥ 0.")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise KernelInputError(
            f"learning_rate={learning_rate!r}; expected a number > 0."
        )
    reg = float(diag_reg)
    if not diag_reg_absolute_scale and reg > 0:
        reg *= float(source.diagonal().mean())
    return MsePredictor(
        source, y, float(learning_rate), reg, parse_budget(memory_budget)
    )
