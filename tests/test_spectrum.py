"""Eigenvalues of stored kernels: Lanczos, randomized, dense; plot."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ntkdist.regression import KernelInputError, plot_spectrum, spectrum


def kernel(output, n=40, o=3, p=90, seed=0, decay=False):
    r = np.random.default_rng(seed)
    j = r.standard_normal((n, o, p))
    if decay:
        j *= 0.7 ** np.arange(p)
    theta = np.einsum("iap,jbp->ijab", j, j) / p
    if output == "full":
        return theta, theta.transpose(0, 2, 1, 3).reshape(n * o, n * o)
    if output == "diagonal":
        k = np.ascontiguousarray(np.einsum("ijaa->ija", theta))
        return k, None
    k = np.einsum("ijaa->ij", theta) / o
    return k, k


def on_disk(path, k, chunk=9):
    z = zarr.create_array(
        str(path),
        shape=k.shape,
        chunks=(chunk, chunk, *k.shape[2:]),
        dtype="f8",
        fill_value=np.nan,
    )
    z[...] = k
    return z


def all_eigenvalues(k, mat):
    if mat is None:  # diagonal: the union of each column's kernel spectrum
        return np.sort(
            np.concatenate([np.linalg.eigvalsh(k[:, :, a]) for a in range(k.shape[2])])
        )[::-1]
    return np.linalg.eigvalsh(mat)[::-1]


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
def test_lanczos_matches_eigvalsh(tmp_path, output):
    k, mat = kernel(output)
    z = on_disk(tmp_path / "k", k)
    spec = spectrum(z, k=6, method="lanczos", memory_budget="512KiB", smallest=False)
    ref = all_eigenvalues(k, mat)
    assert spec.method == "lanczos" and spec.passes > 0
    np.testing.assert_allclose(spec.eigenvalues, ref[:6], rtol=1e-9)
    dense = spectrum(k, k=6, method="dense")
    np.testing.assert_allclose(dense.eigenvalues, ref[:6], rtol=1e-12)
    assert dense.smallest == pytest.approx(ref[-1], abs=1e-10)


def test_eigenvectors_and_condition_number(tmp_path):
    k, _ = kernel("trace", n=30, p=200, seed=1)  # positive definite
    z = on_disk(tmp_path / "k", k)
    spec = spectrum(z, k=4, vectors=True, method="lanczos", memory_budget="16KiB")
    v = spec.eigenvectors
    np.testing.assert_allclose(k @ v, v * spec.eigenvalues, atol=1e-9)
    lam = np.linalg.eigvalsh(k)
    assert spec.smallest == pytest.approx(lam[0], rel=1e-8)
    assert spec.condition_number == pytest.approx(lam[-1] / lam[0], rel=1e-8)
    singular, _ = kernel("trace", n=30, p=5, seed=1)  # rank 3 * 5 < n
    assert spectrum(singular, k=2, method="dense").condition_number == float("inf")


def test_randomized_matches_top_eigenvalues_of_a_decaying_spectrum(tmp_path):
    k, mat = kernel("full", n=30, o=2, p=40, seed=2, decay=True)
    z = on_disk(tmp_path / "k", k, chunk=7)
    spec = spectrum(
        z, k=5, method="randomized", memory_budget="32KiB", smallest=False, vectors=True
    )
    ref = np.linalg.eigvalsh(mat)[::-1][:5]
    np.testing.assert_allclose(spec.eigenvalues, ref, rtol=1e-8)
    assert spec.passes == 6 + 2
    np.testing.assert_allclose(
        mat @ spec.eigenvectors, spec.eigenvectors * ref, atol=1e-6
    )


def test_plot_is_a_png(tmp_path):
    k, _ = kernel("trace", n=25, seed=3)
    out = plot_spectrum(spectrum(k, k=10), tmp_path / "decay.png")
    data = (tmp_path / "decay.png").read_bytes()
    assert out.endswith("decay.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_bad_requests():
    k, _ = kernel("trace", n=10)
    with pytest.raises(KernelInputError, match="k=11"):
        spectrum(k, k=11)
    with pytest.raises(KernelInputError, match="square"):
        spectrum(k[:, :6], k=2)
    with pytest.raises(KernelInputError, match="method"):
        spectrum(k, k=2, method="power")
