"""Kernel ridge regression on arrays, zarr arrays on disk and kernel stores."""

from __future__ import annotations

import dataclasses
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
import zarr
from sklearn.base import clone
from sklearn.kernel_ridge import KernelRidge
from sklearn.model_selection import cross_val_score
from zarr.storage import LocalStore, WrapperStore

import ntkdist
from ntkdist._errors import InputError
from ntkdist.regression import (
    FingerprintMismatchError,
    IncompleteKernelError,
    KernelInputError,
    KernelRidgeRegressor,
    SolverError,
    kernel_ridge,
)
from ntkdist.storage import KernelStore

RNG = np.random.default_rng(0)


def features_kernel(n, o=1, p=40, seed=0):
    """A PSD full kernel Θ[i, j, a, b] = <J_ia, J_jb> from random features."""
    j = np.random.default_rng(seed).standard_normal((n, o, p)) / np.sqrt(p)
    return np.einsum("iap,jbp->ijab", j, j)


def reduce(theta, output):
    if output == "full":
        return theta
    if output == "diagonal":
        return np.ascontiguousarray(np.einsum("ijaa->ija", theta))
    return np.einsum("ijaa->ij", theta) / theta.shape[2]


def to_zarr(path, k, chunk, dtype="f8"):
    z = zarr.create_array(
        str(path),
        shape=k.shape,
        chunks=(chunk, chunk, *k.shape[2:]),
        dtype=dtype,
        fill_value=np.nan,
    )
    z[...] = k
    return z


class CountingStore(WrapperStore):
    """Records every key read and its size."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = []

    def _with_store(self, store):
        return type(self)(store)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.reads.append((key, len(buf)))
        return buf


def dense_matrix(theta, output):
    """The operator matrix of each form, for reference solves."""
    n, _, o, _ = theta.shape
    if output == "full":
        return theta.transpose(0, 2, 1, 3).reshape(n * o, n * o)
    return reduce(theta, output)


# ---- agreement with references ------------------------------------------------


@pytest.mark.parametrize("container", ["numpy", "zarr"])
def test_predictions_equal_sklearn_and_numpy(tmp_path, container):
    k_all = reduce(features_kernel(70, o=1, p=30), "trace")
    ktr, kte = k_all[:50, :50], k_all[50:, :50]
    y = RNG.standard_normal((50, 3))
    ridges = [1e-3, 1e-1, 2.0]
    if container == "zarr":
        ktr_in = to_zarr(tmp_path / "tr", ktr, 16)
        kte_in = to_zarr(tmp_path / "te", np.ascontiguousarray(kte), 16)
    else:
        ktr_in, kte_in = ktr, kte
    fit = kernel_ridge(ktr_in, y, ridges, method="cholesky")
    preds = fit.predict(kte_in)
    assert preds.shape == (3, 20, 3)
    for r, lam in enumerate(ridges):
        sk = KernelRidge(alpha=lam, kernel="precomputed").fit(ktr, y).predict(kte)
        dense = kte @ np.linalg.solve(ktr + lam * np.eye(50), y)
        np.testing.assert_allclose(preds[r], sk, rtol=0, atol=1e-8)
        np.testing.assert_allclose(preds[r], dense, rtol=0, atol=1e-8)
    assert fit.residuals.max() < 1e-10


@pytest.mark.parametrize("output", ["full", "diagonal", "trace", "pntk"])
def test_each_form_is_its_documented_regression(output):
    theta = features_kernel(24, o=3, p=50, seed=1)
    k = reduce(theta, output)
    c = 3
    y = RNG.standard_normal((24, c))
    lam = 0.05
    fit = kernel_ridge(k, y, lam)
    coef = fit.coef[0]
    if output == "full":
        mat = dense_matrix(theta, "full")
        expected = np.linalg.solve(mat + lam * np.eye(72), y.reshape(-1)).reshape(24, 3)
    elif output == "diagonal":
        expected = np.stack(
            [np.linalg.solve(k[:, :, a] + lam * np.eye(24), y[:, a]) for a in range(3)],
            axis=1,
        )
    else:
        expected = np.linalg.solve(k + lam * np.eye(24), y)
    np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
@pytest.mark.parametrize("preconditioner", ["nystrom", "block", "jacobi", "none"])
def test_cg_matches_cholesky(tmp_path, output, preconditioner):
    theta = features_kernel(45, o=2, p=200, seed=2)
    k = reduce(theta, output)
    z = to_zarr(tmp_path / "k", k, 10)  # ragged: 45 = 4 * 10 + 5
    y = RNG.standard_normal((45, 2))
    ridges = [1e-2, 1.0]
    exact = kernel_ridge(z, y, ridges, method="cholesky")
    tol = 1e-10
    cg = kernel_ridge(
        z,
        y,
        ridges,
        method="cg",
        tol=tol,
        memory_budget="256KiB",
        preconditioner=preconditioner,
    )
    assert cg.method == "cg" and cg.iterations > 0
    assert cg.preconditioner == preconditioner
    assert cg.residuals.max() <= tol
    # The stated tolerance: relative error ≤ cond(K + λI) · tol.
    cond = np.linalg.cond(
        dense_matrix(theta, "full" if output == "full" else "trace")
        + 1e-2 * np.eye(k.shape[0] * (2 if output == "full" else 1))
    )
    scale = np.abs(exact.coef).max()
    np.testing.assert_allclose(
        cg.coef, exact.coef, rtol=0, atol=cond * tol * scale * 10
    )


def test_preconditioners_cut_iterations(tmp_path):
    # An NTK-like kernel: ReLU random features, one dominant eigenvalue, fast decay.
    r = np.random.default_rng(3)
    feats = np.maximum(r.standard_normal((200, 10)) @ r.standard_normal((10, 300)), 0)
    k = feats @ feats.T / 300
    z = to_zarr(tmp_path / "k", k, 100)
    y = r.standard_normal((200, 2))
    its = {
        p: kernel_ridge(
            z, y, 1e-2, method="cg", tol=1e-6, preconditioner=p, rank=40, maxiter=5000
        ).iterations
        for p in ("nystrom", "jacobi", "none")
    }
    assert 2 * its["nystrom"] < min(its["jacobi"], its["none"]), its


def test_float32_kernel_is_solved_in_float64(tmp_path):
    k = reduce(features_kernel(30, p=60, seed=4), "trace").astype(np.float32)
    z = to_zarr(tmp_path / "k", k, 8, dtype="f4")
    y = RNG.standard_normal(30)
    fit = kernel_ridge(z, y, 1e-2, method="cg", tol=1e-12)
    expected = np.linalg.solve(k.astype(np.float64) + 1e-2 * np.eye(30), y)
    assert fit.coef.dtype == np.float64
    np.testing.assert_allclose(fit.coef[0, :, 0], expected, rtol=1e-8, atol=1e-8)


# ---- streaming -----------------------------------------------------------------


def test_streamed_solve_reads_tiles_never_the_whole_kernel(tmp_path):
    n, chunk = 400, 100
    k = reduce(features_kernel(n, p=100, seed=5), "trace")
    to_zarr(tmp_path / "k", k, chunk)
    counting = CountingStore(LocalStore(str(tmp_path / "k"), read_only=True))
    z = zarr.open_array(store=counting, mode="r")
    y = RNG.standard_normal((n, 2))
    counting.reads.clear()
    kernel_bytes = n * n * 8
    budget = kernel_bytes // 8  # blocks of at most budget // 8 = one chunk
    tracemalloc.start()
    fit = kernel_ridge(
        z,
        y,
        [1e-1, 1.0],
        method="cg",
        tol=1e-6,
        memory_budget=budget,
        preconditioner="jacobi",
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    chunk_keys = {key for key, _ in counting.reads if key.startswith("c/")}
    n_chunks = (n // chunk) ** 2
    assert len(chunk_keys) == n_chunks
    # Jacobi setup reads the 4 diagonal tiles once; then each iteration reads
    # every chunk exactly once, for all 4 right-hand sides together.
    reads = [key for key, _ in counting.reads if key.startswith("c/")]
    assert len(reads) == n // chunk + fit.iterations * n_chunks
    assert peak < kernel_bytes / 2, (peak, kernel_bytes)
    expected = kernel_ridge(k, y, [1e-1, 1.0], method="cholesky")
    np.testing.assert_allclose(
        fit.predict(k), expected.predict(k), rtol=1e-4, atol=1e-4
    )


# ---- stores --------------------------------------------------------------------


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def make_params(seed=0, d=4, h=16, o=3):
    r = np.random.default_rng(seed)
    return {"w1": r.standard_normal((d, h)) / 2, "w2": r.standard_normal((h, o)) / 4}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    r = np.random.default_rng(1)
    x_train, x_test = r.standard_normal((20, 4)), r.standard_normal((9, 4))
    params = make_params()
    kw = {"output": "trace", "tile": 6, "executor": "serial", "progress": False}
    out = {
        "x_train": x_train,
        "x_test": x_test,
        "params": params,
        "train": ntkdist.compute(mlp, params, x_train, store=root / "train", **kw),
        "cross": ntkdist.compute(
            mlp, params, x_test, x_train, store=root / "cross", **kw
        ),
        "cross_t": ntkdist.compute(
            mlp, params, x_train, x_test, store=root / "crt", **kw
        ),
        "other_params": ntkdist.compute(
            mlp, make_params(seed=9), x_test, x_train, store=root / "op", **kw
        ),
        "other_train": ntkdist.compute(
            mlp, params, x_test, x_train[:-1] + 0.5, store=root / "ot", **kw
        ),
        "full": ntkdist.compute(
            mlp, params, x_train, store=root / "full", **{**kw, "output": "full"}
        ),
    }
    return out


def test_store_regression_matches_in_memory(stores):
    s = stores
    y = np.random.default_rng(2).standard_normal((20, 3))
    k_tr = ntkdist.ntk(mlp, s["params"], s["x_train"], output="trace")
    k_te = ntkdist.ntk(mlp, s["params"], s["x_test"], s["x_train"], output="trace")
    expected = k_te @ np.linalg.solve(k_tr + 0.1 * np.eye(20), y)
    for method in ("cholesky", "cg"):
        fit = kernel_ridge(
            ntkdist.open(s["train"].path), y, 0.1, method=method, tol=1e-12
        )
        np.testing.assert_allclose(fit.predict(s["cross"])[0], expected, atol=1e-8)
        # A train × test store is recognised by its fingerprint and transposed.
        np.testing.assert_allclose(fit.predict(s["cross_t"])[0], expected, atol=1e-8)


def test_symmetric_store_streams_upper_triangle_only(stores):
    s = stores["full"]
    counting = CountingStore(LocalStore(s.path, read_only=True))
    z = zarr.open_array(store=counting, path="kernel", mode="r")

    @dataclasses.dataclass
    class Counted:  # the store's contract, over the counting zarr store
        kernel: object
        output: str = s.output
        out_dim: int = s.out_dim
        n1: int = s.n1
        n2: int = s.n2
        symmetric: bool = s.symmetric
        complete: bool = True
        fields: dict = dataclasses.field(default_factory=lambda: dict(s.fields))

    src = ntkdist.regression.as_kernel(Counted(z))
    x = np.random.default_rng(0).standard_normal((20, 3, 2))
    counting.reads.clear()
    got = src.matmat(x, block_bytes=1)
    reads = [k for k, _ in counting.reads if k.startswith("kernel/c/")]
    assert len(reads) == 4 * 5 // 2  # upper triangle of a 4 x 4 tile grid
    dense = np.asarray(s.kernel[...]).transpose(0, 2, 1, 3).reshape(60, 60)
    np.testing.assert_allclose(got.reshape(60, 2), dense @ x.reshape(60, 2), atol=1e-10)


@pytest.mark.parametrize(
    ("which", "field"),
    [("other_params", "params"), ("other_train", "x1")],
)
def test_cross_kernel_from_another_job_is_refused(stores, which, field):
    fit = kernel_ridge(stores["train"], np.ones(20), 0.1)
    with pytest.raises(FingerprintMismatchError, match=field):
        fit.predict(stores[which])


def test_cross_kernel_from_another_model_is_refused(stores, tmp_path):
    other = ntkdist.compute(
        lambda p, x: jnp.sin(x @ p["w1"]) @ p["w2"],
        stores["params"],
        stores["x_test"],
        stores["x_train"],
        store=tmp_path / "m",
        output="trace",
        tile=6,
        executor="serial",
        progress=False,
    )
    fit = kernel_ridge(stores["train"], np.ones(20), 0.1)
    with pytest.raises(FingerprintMismatchError, match="model"):
        fit.predict(other)


def test_incomplete_store_is_refused_unless_allowed(stores, tmp_path):
    import shutil

    path = tmp_path / "partial"
    shutil.copytree(stores["train"].path, path)
    writable = KernelStore.open(path, mode="r+")
    writable.clear_tiles([writable.plan.tiles()[-1]])
    partial = ntkdist.open(path)
    assert not partial.complete
    with pytest.raises(IncompleteKernelError, match="unfinished"):
        kernel_ridge(partial, np.ones(20), 0.1)
    for method in ("cholesky", "cg"):
        with pytest.raises(IncompleteKernelError, match="NaN"):
            kernel_ridge(
                partial, np.ones(20), 0.1, allow_incomplete=True, method=method
            )


# ---- bad input -----------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    k = reduce(features_kernel(10, o=2), "full")
    with pytest.raises(KernelInputError, match=r"expected labels \[10\]"):
        kernel_ridge(k, np.ones((9, 2)), 0.1)
    with pytest.raises(KernelInputError, match="O=2 outputs"):
        kernel_ridge(k, np.ones((10, 3)), 0.1)
    for bad in (0.0, -1.0, [0.1, 0.0], float("nan")):
        with pytest.raises(InputError, match="positive"):
            kernel_ridge(k, np.ones((10, 2)), bad)
    with pytest.raises(KernelInputError, match="square"):
        kernel_ridge(k[:, :5], np.ones((10, 2)), 0.1)
    with pytest.raises(KernelInputError, match="method"):
        kernel_ridge(k, np.ones((10, 2)), 0.1, method="lu")
    fit = kernel_ridge(k, np.ones((10, 2)), 0.1)
    with pytest.raises(KernelInputError, match=r"\(n_test, 10"):
        fit.predict(k[:, :4])
    with pytest.raises(KernelInputError, match="same output form"):
        fit.predict(k[:, :, 0, 0])


def test_singular_kernel_with_tiny_ridge_fails_clearly():
    k = np.ones((5, 5))
    with pytest.raises(SolverError, match="larger ridge"):
        kernel_ridge(k, np.ones(5), 1e-300, method="cholesky")


# ---- scikit-learn estimator ----------------------------------------------------


def test_estimator_is_sklearn_compatible():
    k = reduce(features_kernel(60, p=30, seed=6), "trace")
    y = np.random.default_rng(3).standard_normal(60)
    est = KernelRidgeRegressor(ridge=0.3)
    assert clone(est).get_params() == est.get_params()
    ours = cross_val_score(est, k, y, cv=3)
    ref = cross_val_score(KernelRidge(alpha=0.3, kernel="precomputed"), k, y, cv=3)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    est.fit(k[:40, :40], y[:40])
    assert est.predict(k[40:, :40]).shape == (20,)
    sk = KernelRidge(alpha=0.3, kernel="precomputed").fit(k[:40, :40], y[:40])
    assert est.score(k[40:, :40], y[40:]) == pytest.approx(
        sk.score(k[40:, :40], y[40:]), abs=1e-8
    )
    with pytest.raises(KernelInputError, match="not a parameter"):
        est.set_params(alpha=1.0)


def test_blocked_cholesky_matches_lapack():
    from ntkdist.regression._linalg import cho_solve, cholesky

    r = np.random.default_rng(8)
    f = r.standard_normal((130, 150))
    a = f @ f.T / 150 + 1e-3 * np.eye(130)
    b = r.standard_normal((130, 3))
    lower = cholesky(a.copy(), block=32)  # ragged: 130 = 4 * 32 + 2
    np.testing.assert_allclose(lower, np.linalg.cholesky(a), atol=1e-10)
    assert np.all(np.triu(lower, 1) == 0)
    np.testing.assert_allclose(
        cho_solve(lower, b, block=32), np.linalg.solve(a, b), rtol=1e-8, atol=1e-8
    )
    with pytest.raises(np.linalg.LinAlgError):
        cholesky(-a, block=32)


def test_estimator_streams_a_zarr_kernel(tmp_path):
    k = reduce(features_kernel(50, p=80, seed=9), "trace")
    y = np.random.default_rng(4).standard_normal((40, 2))
    z = to_zarr(tmp_path / "k", np.ascontiguousarray(k[:40, :40]), 16)
    cross = to_zarr(tmp_path / "c", np.ascontiguousarray(k[40:, :40]), 16)
    est = KernelRidgeRegressor(ridge=0.05, method="cg", tol=1e-12, rank=10).fit(z, y)
    assert est.solution_.method == "cg"
    expected = KernelRidge(alpha=0.05, kernel="precomputed").fit(k[:40, :40], y)
    np.testing.assert_allclose(
        est.predict(cross), expected.predict(k[40:, :40]), atol=1e-8
    )
