"""The eigenvalues of a stored kernel: top-k, smallest, condition number, plot.

The operator is the one of :mod:`ntkdist.regression._source`: the ``N·O × N·O``
matrix for ``full`` kernels (eigenvector index ``i*O + a``), ``K`` itself for
``trace``/``pntk`` (the eigenvalues of ``K ⊗ I_C`` are these, each ``C``
times), and the block-diagonal operator of the ``O`` kernels ``K[:, :, a]`` for
``diagonal`` (eigenvector index ``i*O + a``, zero outside its column ``a``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, final

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse.linalg

from ._source import (
    KernelInputError,
    KernelSource,
    as_kernel,
    check_square,
    parse_budget,
)

SPECTRUM_METHODS = ("auto", "dense", "lanczos", "randomized")


@final
@dataclasses.dataclass(frozen=True, eq=False)
class Spectrum:
    """Eigenvalues of a kernel operator.

    Attributes:
        eigenvalues: the ``k`` largest, in descending order (float64).
        eigenvectors: ``[N·w, k]`` matching ``eigenvalues``, or ``None``.
        smallest: the smallest eigenvalue, or ``None`` when not computed (or
            Lanczos did not converge to it).
        condition_number: ``largest / smallest``; ``inf`` when the smallest is
            below ``size · eps · largest`` (numerically singular); ``None``
            when the smallest is unknown.
        method: ``"dense"``, ``"lanczos"`` or ``"randomized"``.
        output: the kernel's output form.
        size: the operator's dimension ``N·w``.
        passes: passes over the stored kernel (0 for dense: one full read).
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    smallest: float | None
    condition_number: float | None
    method: str
    output: str
    size: int
    passes: int

    def __str__(self) -> str:
        """A short human-readable summary."""
        top = ", ".join(f"{v:.4g}" for v in self.eigenvalues[:5])
        lines = [
            f"{self.output} kernel operator of size {self.size} ({self.method}, "
            f"{self.passes} passes)",
            f"top {len(self.eigenvalues)} eigenvalues: {top}"
            + (", ..." if len(self.eigenvalues) > 5 else ""),
        ]
        if self.smallest is not None:
            lines.append(f"smallest eigenvalue: {self.smallest:.4g}")
            lines.append(f"condition number: {self.condition_number:.4g}")
        return "\n".join(lines)


def _condition(largest: float, smallest: float | None, size: int) -> float | None:
    if smallest is None:
        return None
    if smallest <= size * np.finfo(np.float64).eps * abs(largest):
        return float("inf")
    return float(largest / smallest)


def spectrum(
    kernel: Any,
    k: int = 20,
    *,
    vectors: bool = False,
    smallest: bool = True,
    method: str = "auto",
    memory_budget: int | str | None = None,
    tol: float = 0.0,
    power_iterations: int = 6,
    oversample: int = 10,
    seed: int = 0,
    allow_incomplete: bool = False,
) -> Spectrum:
    """The ``k`` largest eigenvalues (and vectors), smallest one, condition number.

    Args:
        kernel: a square kernel: array, ``zarr.Array`` or store.
        k: how many of the largest eigenvalues.
        vectors: also return their eigenvectors.
        smallest: also find the smallest eigenvalue (Lanczos on a streamed
            kernel may not converge to it; it is then ``None``).
        method: ``"dense"`` (load and ``eigh``), ``"lanczos"`` (ARPACK over a
            streamed operator, one pass per product), ``"randomized"``
            (subspace iteration with ``k + oversample`` vectors per pass,
            ``power_iterations + 2`` passes), or ``"auto"`` (dense when twice
            the float64 kernel fits ``memory_budget``, else Lanczos).
        memory_budget: bytes; default ``"4GiB"``.
        tol: Lanczos relative accuracy (0: machine precision).
        power_iterations: randomized method's extra passes.
        oversample: randomized method's extra vectors.
        seed: randomized method's and Lanczos' start vector seed.
        allow_incomplete: accept an unfinished store (NaN still fails).

    Returns:
        The spectrum.

    Example:
        >>> import numpy as np
        >>> spectrum(np.diag([3.0, 2.0, 1.0]), k=2).eigenvalues.tolist()
        [3.0, 2.0]
    """
    source = as_kernel(kernel, name="kernel", allow_incomplete=allow_incomplete)
    check_square(source)
    size = source.shape[0] * source.width
    if method not in SPECTRUM_METHODS:
        raise KernelInputError(
            f"method={method!r}; expected one of {list(SPECTRUM_METHODS)}."
        )
    if not 1 <= k <= size:
        raise KernelInputError(
            f"k={k}; expected 1 ≤ k ≤ {size} (the operator's dimension)."
        )
    budget = parse_budget(memory_budget)
    if method == "auto":
        method = "dense" if 2 * source.dense_bytes() <= budget else "lanczos"
    if method == "lanczos" and k >= size - 1:
        method = "dense"
    if method == "dense":
        return _dense(source, k, vectors=vectors, smallest=smallest)
    counter = _Operator(source, max(1, budget // 8))
    if method == "lanczos":
        return _lanczos(
            counter, k, vectors=vectors, smallest=smallest, tol=tol, seed=seed
        )
    return _randomized(
        counter,
        k,
        vectors=vectors,
        smallest=smallest,
        power_iterations=power_iterations,
        oversample=oversample,
        seed=seed,
    )


def _dense(source: KernelSource, k: int, *, vectors: bool, smallest: bool) -> Spectrum:
    n, w = source.shape[0], source.width
    vals: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    for a, mat in enumerate(source.dense_matrices()):
        if not vectors:
            vals.append(np.linalg.eigvalsh(mat))
            continue
        lam, v = np.linalg.eigh(mat)
        vals.append(lam)
        if source.output == "diagonal":
            full = np.zeros((n, w, v.shape[1]))
            full[:, a, :] = v
            v = full.reshape(n * w, -1)
        vecs.append(v)
    lam = np.concatenate(vals)
    order = np.argsort(lam)[::-1]
    top = order[:k]
    eigvecs = np.concatenate(vecs, axis=1)[:, top] if vectors else None
    low = float(lam[order[-1]]) if smallest else None
    return Spectrum(
        lam[top].copy(),
        eigvecs,
        low,
        _condition(float(lam[order[0]]), low, lam.size),
        "dense",
        source.output,
        lam.size,
        0,
    )


@dataclasses.dataclass(eq=False)
class _Operator:
    """The kernel as a ``[size, m]`` matrix product, counting passes."""

    source: KernelSource
    block_bytes: int
    passes: int = 0

    @property
    def size(self) -> int:
        return self.source.shape[0] * self.source.width

    def __call__(self, v: np.ndarray) -> np.ndarray:
        n, w = self.source.shape[0], self.source.width
        v2 = np.asarray(v, dtype=np.float64).reshape(self.size, -1)
        self.passes += 1
        out = self.source.matmat(
            np.ascontiguousarray(v2.reshape(n, w, -1)), self.block_bytes
        )
        return out.reshape(v2.shape) if np.ndim(v) == 2 else out.reshape(-1)

    def linear_operator(self) -> scipy.sparse.linalg.LinearOperator:
        import scipy.sparse.linalg

        return scipy.sparse.linalg.LinearOperator(
            (self.size, self.size), matvec=self, matmat=self, dtype=np.float64
        )


def _lanczos(
    op: _Operator, k: int, *, vectors: bool, smallest: bool, tol: float, seed: int
) -> Spectrum:
    import scipy.sparse.linalg  # about 0.2 s: only for a spectrum

    lin = op.linear_operator()
    v0 = np.random.default_rng(seed).standard_normal(op.size)
    lam, vec = scipy.sparse.linalg.eigsh(lin, k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(lam)[::-1]
    low = None
    if smallest:
        try:
            low = float(
                scipy.sparse.linalg.eigsh(
                    lin,
                    k=1,
                    which="SA",
                    tol=tol,
                    v0=v0,
                    maxiter=50,
                    ncv=min(op.size, 40),
                    return_eigenvectors=False,
                )[0]
            )
        except scipy.sparse.linalg.ArpackNoConvergence:
            low = None
    return Spectrum(
        lam[order],
        vec[:, order] if vectors else None,
        low,
        _condition(float(lam[order[0]]), low, op.size),
        "lanczos",
        op.source.output,
        op.size,
        op.passes,
    )


def _randomized(
    op: _Operator,
    k: int,
    *,
    vectors: bool,
    smallest: bool,
    power_iterations: int,
    oversample: int,
    seed: int,
) -> Spectrum:
    width = min(op.size, k + oversample)
    q = np.random.default_rng(seed).standard_normal((op.size, width))
    for _ in range(power_iterations + 1):
        q, _ = np.linalg.qr(op(q))
    b = q.T @ op(q)
    lam, u = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(lam)[::-1][:k]
    low = float(lam.min()) if smallest and width == op.size else None
    return Spectrum(
        lam[order],
        (q @ u[:, order]) if vectors else None,
        low,
        _condition(float(lam[order[0]]), low, op.size),
        "randomized",
        op.source.output,
        op.size,
        op.passes,
    )


def plot_spectrum(
    spec: Spectrum, path: str | os.PathLike[str], *, title: str | None = None
) -> str:
    """Save a PNG of the eigenvalue decay (log scale); returns the path.

    Needs matplotlib (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise KernelInputError(
            "plotting the spectrum needs matplotlib; install it with "
            "`pip install matplotlib`."
        ) from err
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    idx = np.arange(1, len(spec.eigenvalues) + 1)
    positive = np.where(spec.eigenvalues > 0, spec.eigenvalues, np.nan)
    ax.semilogy(idx, positive, "o-", ms=3, label="largest eigenvalues")
    if spec.smallest is not None and spec.smallest > 0:
        ax.axhline(
            spec.smallest,
            color="C3",
            ls="--",
            lw=1,
            label=f"smallest {spec.smallest:.3g}",
        )
    ax.set_xlabel("index k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("eigenvalue λ_k")
    ax.set_title(
        title or f"{spec.output} NTK spectrum (size {spec.size}, {spec.method})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    plt.close(fig)
    return os.fspath(path)
