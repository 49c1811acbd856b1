"""Shifted kernel solves ``(K + λ I) X = B`` for many right-hand sides at once.

Right-hand sides are held as ``B[n, w, m]`` (see :mod:`ntkdist.regression._source`
for the layout) and column ``k`` has its own shift ``λ_k``. Two methods:

- :func:`dense_solve`: the kernel in memory, one Cholesky factor per distinct
  shift (and per output column for ``diagonal`` kernels), float64.
- :func:`cg_solve`: preconditioned conjugate gradient on every column at once.
  Each iteration is **one** pass over the stored tiles that multiplies all
  still-active columns; columns stop when their relative residual
  ``‖B_k − (K + λ_k I) X_k‖ / ‖B_k‖`` drops to ``tol``. The preconditioner is
  randomized Nyström of a given rank (``"nystrom"``: one extra pass, the best
  for fast-decaying NTK spectra), block-Jacobi over the diagonal tiles
  (``"block"``), the plain diagonal (``"jacobi"``) or none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import final

import numpy as np

from .._errors import KernelInputError, SolverError as SolverError
from ._source import KernelSource


@final
@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Solution of ``(K + λ_k I) X_k = B_k`` for every column ``k``.

    Attributes:
        x: the solutions, ``[n, w, m]`` float64.
        residuals: relative residual per column, ``[m]``.
        method: ``"cholesky"`` or ``"cg"``.
        iterations: CG iterations (passes over the kernel); 0 for Cholesky.
        preconditioner: the CG preconditioner used (``"none"`` for Cholesky).
        column_iterations: the iteration at which each column converged, ``[m]``.
    """

    x: np.ndarray
    residuals: np.ndarray
    method: str
    iterations: int
    preconditioner: str
    column_iterations: np.ndarray


def _systems(output: str, arr: np.ndarray) -> list[np.ndarray]:
    """2-D views of ``arr[n, w, m]``, one per independent matrix of the kernel."""
    n, w, m = arr.shape
    if output == "full":
        return [arr.reshape(n * w, m)]
    if output == "diagonal":
        return [arr[:, a, :] for a in range(w)]
    return [arr[:, 0, :]]


BLOCK = 2048
"""Side of the blocks of :func:`cholesky` and :func:`cho_solve`.

Every BLAS and LAPACK call they make is at most ``BLOCK`` on each side: the
threaded OpenBLAS shipped in numpy/scipy wheels (0.3.34 on this project's
machines) segfaults in ``dpotrf`` and ``dgemm`` on 20000-wide float64
operands, and blocking also bounds the temporaries.
"""


def cholesky(a: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Lower Cholesky factor of ``a``, computed in place, right-looking by blocks.

    Raises:
        numpy.linalg.LinAlgError: ``a`` is not positive definite.

    Example:
        >>> import numpy as np
        >>> a = np.array([[4.0, 2.0], [2.0, 3.0]])
        >>> np.allclose(cholesky(a.copy(), block=1) @ cholesky(a.copy()).T, a)
        True
    """
    import scipy.linalg

    n = a.shape[0]
    for k in range(0, n, block):
        e = min(n, k + block)
        lkk = scipy.linalg.cholesky(a[k:e, k:e], lower=True, check_finite=False)
        a[k:e, k:e] = lkk
        for i in range(e, n, block):
            g = min(n, i + block)
            a[i:g, k:e] = scipy.linalg.solve_triangular(
                lkk, a[i:g, k:e].T, lower=True, check_finite=False
            ).T
        for j in range(e, n, block):
            f = min(n, j + block)
            lj = a[j:f, k:e]
            for i in range(j, n, block):
                g = min(n, i + block)
                a[i:g, j:f] -= a[i:g, k:e] @ lj.T
    return _tril_inplace(a, block)


def _tril_inplace(a: np.ndarray, block: int) -> np.ndarray:
    """Zero the strict upper triangle, one block row at a time."""
    n = a.shape[0]
    for k in range(0, n, block):
        e = min(n, k + block)
        a[k:e, k:e] = np.tril(a[k:e, k:e])
        a[k:e, e:] = 0.0
    return a


def solve_lower(lower: np.ndarray, b: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Solve ``L y = b`` by blocked forward substitution."""
    import scipy.linalg

    n = lower.shape[0]
    y = np.array(b, dtype=np.float64)
    for k in range(0, n, block):
        e = min(n, k + block)
        for j in range(0, k, block):
            y[k:e] -= lower[k:e, j : j + block] @ y[j : j + block]
        y[k:e] = scipy.linalg.solve_triangular(
            lower[k:e, k:e], y[k:e], lower=True, check_finite=False
        )
    return y


def cho_solve(lower: np.ndarray, b: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Solve ``L Lᵀ x = b`` by blocked forward and back substitution."""
    import scipy.linalg

    n = lower.shape[0]
    y = solve_lower(lower, b, block)
    for k in reversed(range(0, n, block)):
        e = min(n, k + block)
        for j in range(e, n, block):
            g = min(n, j + block)
            y[k:e] -= lower[j:g, k:e].T @ y[j:g]
        y[k:e] = scipy.linalg.solve_triangular(
            lower[k:e, k:e], y[k:e], lower=True, trans="T", check_finite=False
        )
    return y


def _factor(mat: np.ndarray, shift: float, name: str) -> tuple[np.ndarray, bool]:
    a = mat.copy()
    a[np.diag_indices_from(a)] += shift
    try:
        return cholesky(a), True
    except np.linalg.LinAlgError as err:
        raise SolverError(
            f"{name} plus ridge {shift:g} is not positive definite (Cholesky failed: "
            f"{err}). Use a larger ridge; a kernel with duplicate or collinear "
            "samples is singular without one."
        ) from err


def dense_solve(source: KernelSource, b: np.ndarray, shifts: np.ndarray) -> SolveResult:
    """Solve in memory with one Cholesky factor per distinct shift.

    Args:
        source: the square kernel.
        b: right-hand sides ``[n, w, m]``.
        shifts: ``λ_k`` per column, ``[m]``.

    Returns:
        The solutions and their relative residuals.
    """
    mats = source.dense_matrices()
    x = np.zeros_like(b)
    sq_res = np.zeros(b.shape[2])
    for mat, bs, xs in zip(
        mats, _systems(source.output, b), _systems(source.output, x), strict=True
    ):
        for u in np.unique(shifts):
            cols = np.flatnonzero(shifts == u)
            factor = _factor(mat, float(u), source.name)
            xs[:, cols] = cho_solve(factor[0], bs[:, cols])
            del factor  # one factor at a time: peak memory is twice the kernel
        res = bs - mat @ xs - xs * shifts
        sq_res += np.einsum("ij,ij->j", res, res)
    m = b.shape[2]
    return SolveResult(x, _relative(sq_res, b), "cholesky", 0, "none", np.zeros(m, int))


def _relative(sq_res: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ijk,ijk->k", b, b))
    return np.sqrt(sq_res) / np.where(norm > 0, norm, 1.0)


Preconditioner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def jacobi(source: KernelSource, shifts: np.ndarray) -> Preconditioner:
    """``z = r / (diag(K) + λ_k)``; reads the diagonal tiles once."""
    d = source.diagonal()

    def apply(r: np.ndarray, cols: np.ndarray) -> np.ndarray:
        denom = d[:, :, None] + shifts[cols]
        return r / np.where(denom > 0, denom, 1.0)

    return apply


def block_jacobi(source: KernelSource, shifts: np.ndarray) -> Preconditioner:
    """``z = (D + λ_k I)⁻¹ r`` with ``D`` the diagonal tiles of the kernel.

    One Cholesky factor per diagonal tile, distinct shift and independent
    system; reads the diagonal tiles once.
    """
    import scipy.linalg

    unique = np.unique(shifts)
    factors = []
    for r0, r1, block in source.diagonal_blocks():
        mats = _tile_matrices(source.output, block)
        per = {
            float(u): [_factor(m, float(u), source.name) for m in mats] for u in unique
        }
        factors.append((r0, r1, per))

    def apply(r: np.ndarray, cols: np.ndarray) -> np.ndarray:
        z = np.empty_like(r)
        col_shifts = shifts[cols]
        for r0, r1, per in factors:
            rt, zt = r[r0:r1], z[r0:r1]
            for u, facs in per.items():
                sel = np.flatnonzero(col_shifts == u)
                if sel.size == 0:
                    continue
                for fac, rs, zs in zip(
                    facs,
                    _systems(source.output, rt),
                    _systems(source.output, zt),
                    strict=True,
                ):
                    zs[:, sel] = scipy.linalg.cho_solve(
                        fac, rs[:, sel], check_finite=False
                    )
        return z

    return apply


def nystrom(
    source: KernelSource, shifts: np.ndarray, rank: int, block_bytes: int, seed: int = 0
) -> Preconditioner:
    """Randomized Nyström preconditioner; one pass over the tiles with ``rank`` vectors.

    With ``K ≈ U Λ Uᵀ`` of rank ``r`` (Tropp et al. 2017, stabilised by a small
    shift), ``P⁻¹ r = (λ_r + μ) U (Λ + μ)⁻¹ Uᵀ r + (I − U Uᵀ) r`` for each
    column's shift ``μ`` (Frangella, Tropp & Udell 2023). CG then converges as
    if the kernel's spectrum above ``λ_r`` were flattened, which suits NTKs,
    whose eigenvalues decay fast.
    """
    import scipy.linalg

    n, w = source.shape[0], source.width
    size = n * w
    rank = min(rank, size)
    omega, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, rank)))
    y = source.matmat(np.ascontiguousarray(omega.reshape(n, w, rank)), block_bytes)
    y = y.reshape(size, rank)
    nu = np.sqrt(size) * np.finfo(np.float64).eps * np.linalg.norm(y)
    y += nu * omega
    small = (omega.T @ y + y.T @ omega) / 2
    jitter = 0.0
    while True:
        try:
            chol = np.linalg.cholesky(small + jitter * np.eye(rank))
            break
        except np.linalg.LinAlgError:
            jitter = max(2 * jitter, nu, np.finfo(np.float64).tiny)
    b = scipy.linalg.solve_triangular(chol, y.T, lower=True, check_finite=False).T
    u, sigma, _ = np.linalg.svd(b, full_matrices=False)
    lam_hat = np.maximum(sigma**2 - nu, 0.0)
    last = lam_hat[-1]

    def apply(r: np.ndarray, cols: np.ndarray) -> np.ndarray:
        m = r.shape[2]
        flat = r.reshape(size, m)
        mu = shifts[cols]
        ur = u.T @ flat
        scale = (last + mu) / (lam_hat[:, None] + mu)
        z = flat + u @ (ur * scale - ur)
        return z.reshape(n, w, m)

    return apply


def _tile_matrices(output: str, block: np.ndarray) -> list[np.ndarray]:
    if output == "full":
        r, c, o, _ = block.shape
        return [block.transpose(0, 2, 1, 3).reshape(r * o, c * o)]
    if output == "diagonal":
        return [block[:, :, a] for a in range(block.shape[2])]
    return [block]


def block_jacobi_bytes(source: KernelSource, n_shifts: int) -> int:
    """Bytes the block-Jacobi factors take."""
    n = source.shape[0]
    t = min(n, source.stored_chunks[0])
    w = source.width
    per_row = t * w * w if source.output == "full" else t * w
    return 8 * n * per_row * n_shifts


def cg_solve(
    source: KernelSource,
    b: np.ndarray,
    shifts: np.ndarray,
    *,
    tol: float,
    maxiter: int,
    block_bytes: int,
    preconditioner: str,
    rank: int = 200,
) -> SolveResult:
    """Preconditioned CG on all columns, one pass over the tiles per iteration.

    Args:
        source: the square, positive semi-definite kernel.
        b: right-hand sides ``[n, w, m]``.
        shifts: ``λ_k`` per column, ``[m]``; ``K + λ_k I`` must be positive definite.
        tol: stop a column when its relative residual is at most ``tol``.
        maxiter: most iterations (passes over the kernel).
        block_bytes: bytes of one block read from storage.
        preconditioner: ``"nystrom"``, ``"block"``, ``"jacobi"`` or ``"none"``.
        rank: rank of the Nyström preconditioner.

    Returns:
        The solutions, relative residuals and the iteration count.

    Raises:
        SolverError: some column did not reach ``tol`` within ``maxiter``, or
            the kernel is not positive definite along a search direction.
    """
    all_cols = np.arange(b.shape[2])
    if preconditioner == "nystrom":
        precond = nystrom(source, shifts, rank, block_bytes)
    elif preconditioner == "block":
        precond = block_jacobi(source, shifts)
    elif preconditioner == "jacobi":
        precond = jacobi(source, shifts)
    elif preconditioner == "none":
        precond = lambda r, cols: r.copy()
    else:
        raise KernelInputError(
            f"preconditioner={preconditioner!r}; expected 'nystrom', 'block', "
            "'jacobi' or 'none'."
        )
    b_norm = np.sqrt(np.einsum("ijk,ijk->k", b, b))
    x = np.zeros_like(b)
    r = b.copy()
    z = precond(r, all_cols)
    p = z.copy()
    rz = np.einsum("ijk,ijk->k", r, z)
    res = np.where(b_norm > 0, 1.0, 0.0)
    active = res > tol
    done_at = np.zeros(b.shape[2], dtype=int)
    it = 0
    while active.any() and it < maxiter:
        cols = np.flatnonzero(active)
        pa = np.ascontiguousarray(p[:, :, cols])
        ap = source.matmat(pa, block_bytes) + pa * shifts[cols]
        pap = np.einsum("ijk,ijk->k", pa, ap)
        if np.any(pap <= 0):
            raise SolverError(
                f"{source.name} plus its ridge is not positive definite along a CG "
                "direction (pᵀ(K + λI)p ≤ 0). Check that the kernel is an NTK "
                "(positive semi-definite) and that every ridge is positive."
            )
        alpha = rz[cols] / pap
        x[:, :, cols] += alpha * pa
        r[:, :, cols] -= alpha * ap
        it += 1
        rn = np.sqrt(np.einsum("ijk,ijk->k", r[:, :, cols], r[:, :, cols]))
        res[cols] = rn / b_norm[cols]
        active[cols] = res[cols] > tol
        done_at[cols[~active[cols]]] = it
        cols = np.flatnonzero(active)
        if cols.size == 0:
            break
        zc = precond(np.ascontiguousarray(r[:, :, cols]), cols)
        rz_new = np.einsum("ijk,ijk->k", r[:, :, cols], zc)
        beta = rz_new / rz[cols]
        p[:, :, cols] = zc + beta * p[:, :, cols]
        rz[cols] = rz_new
    if active.any():
        raise SolverError(
            f"conjugate gradient on {source.name} did not reach relative residual "
            f"{tol:g} in {maxiter} iterations (worst column: {res.max():.3g}). "
            "Raise maxiter, loosen tol, or use a larger ridge (a small ridge makes "
            "K + λI ill-conditioned)."
        )
    return SolveResult(x, res, "cg", it, preconditioner, done_at)
