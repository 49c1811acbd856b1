"""NTK-GP / linearised-network predictions under gradient descent on MSE."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import zarr

from ntkdist.regression import KernelInputError, gradient_descent_mse

N, M, NOUT = 16, 5, 2


def theta_all(seed=0, p=60):
    j = np.random.default_rng(seed).standard_normal((N + M, NOUT, p)) / np.sqrt(p)
    return np.einsum("iap,jbp->ijab", j, j)


def forms(theta, output):
    """Training matrix, cross matrix and test diagonal in the operator layout."""
    if output == "full":
        k = theta
    elif output == "diagonal":
        k = np.einsum("ijaa->ija", theta)
    else:
        k = np.einsum("ijaa->ij", theta) / NOUT
    return k[:N, :N], k[N:, :N], k[N:, N:]


def systems(k_tr, k_te, k_tt, y, output):
    """(train matrix, cross matrix, test-test matrix, labels) per independent system."""
    if output == "full":
        mat = lambda k: k.transpose(0, 2, 1, 3).reshape(
            k.shape[0] * NOUT, k.shape[1] * NOUT
        )
        return [(mat(k_tr), mat(k_te), mat(k_tt), y.reshape(-1, 1))]
    if output == "diagonal":
        return [
            (k_tr[..., a], k_te[..., a], k_tt[..., a], y[:, a : a + 1])
            for a in range(NOUT)
        ]
    return [(k_tr, k_te, k_tt, y)]


def split(arr, output):
    if output == "full":
        return [arr.reshape(-1, 1)]
    if output == "diagonal":
        return [arr[:, a : a + 1] for a in range(NOUT)]
    return [arr]


def join(parts, output):
    if output == "full":
        return parts[0].reshape(M, NOUT)
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
def test_infinite_time_equals_ridgeless_regression(output):
    k_tr, k_te, k_tt = forms(theta_all(), output)
    y = np.random.default_rng(1).standard_normal((N, NOUT))
    pred = gradient_descent_mse(k_tr, y)(np.inf, k_te, k_test_test=k_tt)
    means, variances = [], []
    for a, b, c, ys in systems(k_tr, k_te, k_tt, y, output):
        means.append(b @ np.linalg.solve(a, ys))
        variances.append(np.diag(c - b @ np.linalg.solve(a, b.T))[:, None])
    np.testing.assert_allclose(pred.test, join(means, output), atol=1e-8)
    np.testing.assert_allclose(pred.train, y, atol=1e-12)
    expected_var = np.broadcast_to(join(variances, output), (M, NOUT))
    np.testing.assert_allclose(pred.test_variance, expected_var, atol=1e-8)
    # t=None is t=inf, as in neural-tangents.
    np.testing.assert_allclose(
        gradient_descent_mse(k_tr, y)(None, k_te).test, pred.test
    )


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
def test_finite_time_matches_matrix_exponential(output):
    k_tr, k_te, k_tt = forms(theta_all(seed=2), output)
    r = np.random.default_rng(3)
    y, f0, g0 = (
        r.standard_normal((N, NOUT)),
        r.standard_normal((N, NOUT)),
        r.standard_normal((M, NOUT)),
    )
    lr, t, reg = 0.5, 37.0, 1e-3
    predict = gradient_descent_mse(
        k_tr, y, learning_rate=lr, diag_reg=reg, diag_reg_absolute_scale=True
    )
    pred = predict(t, k_te, fx_train_0=f0, fx_test_0=g0, k_test_test=k_tt)
    tau = lr * t / y.size  # the 1/(N·C) normalisation of the MSE loss
    trains, tests, variances = [], [], []
    for (a, b, c, ys), f0s, g0s in zip(
        systems(k_tr, k_te, k_tt, y, output),
        split(f0, output),
        split(g0, output),
        strict=True,
    ):
        a = a + reg * np.eye(len(a))
        decay = scipy.linalg.expm(-tau * a)
        trains.append(ys + decay @ (f0s - ys))
        ainv = np.linalg.inv(a)
        tests.append(g0s + b @ ainv @ (np.eye(len(a)) - decay) @ (ys - f0s))
        decay2 = scipy.linalg.expm(-2 * tau * a)
        variances.append(
            np.diag(c - b @ ainv @ (np.eye(len(a)) - decay2) @ b.T)[:, None]
        )
    train = (
        trains[0].reshape(N, NOUT) if output == "full" else np.concatenate(trains, 1)
    )
    np.testing.assert_allclose(pred.train, train, atol=1e-9)
    np.testing.assert_allclose(pred.test, join(tests, output), atol=1e-9)
    np.testing.assert_allclose(
        pred.test_variance,
        np.broadcast_to(join(variances, output), (M, NOUT)),
        atol=1e-9,
    )


def test_time_arrays_zero_time_and_regularisation_scale():
    k_tr, k_te, _ = forms(theta_all(seed=4), "trace")
    y = np.random.default_rng(5).standard_normal((N, 3))
    g0 = np.full((M, 3), 0.25)
    predict = gradient_descent_mse(k_tr, y, diag_reg=1e-2)
    many = predict(np.array([0.0, 10.0, np.inf]), k_te, fx_train_0=0.5, fx_test_0=g0)
    assert many.test.shape == (3, M, 3) and many.train.shape == (3, N, 3)
    np.testing.assert_allclose(many.test[0], g0, atol=1e-12)
    np.testing.assert_allclose(many.train[0], 0.5, atol=1e-12)
    np.testing.assert_allclose(
        many.test[1], predict(10.0, k_te, fx_train_0=0.5, fx_test_0=g0).test
    )
    absolute = gradient_descent_mse(
        k_tr, y, diag_reg=1e-2 * np.mean(np.diag(k_tr)), diag_reg_absolute_scale=True
    )
    np.testing.assert_allclose(
        absolute(np.inf, k_te).test, predict(np.inf, k_te).test, atol=1e-10
    )


def test_infinite_time_mean_streams_when_the_kernel_is_over_budget(tmp_path):
    k_tr, k_te, _ = forms(theta_all(seed=6), "trace")
    z = zarr.create_array(
        str(tmp_path / "k"),
        shape=k_tr.shape,
        chunks=(4, 4),
        dtype="f8",
        fill_value=np.nan,
    )
    z[...] = k_tr
    y = np.random.default_rng(7).standard_normal((N, 1))
    small = gradient_descent_mse(z, y, diag_reg=1e-3, memory_budget=2048)
    dense = gradient_descent_mse(k_tr, y, diag_reg=1e-3)
    np.testing.assert_allclose(
        small(np.inf, k_te).test, dense(np.inf, k_te).test, atol=1e-7
    )
    with pytest.raises(KernelInputError, match="memory_budget"):
        small(10.0, k_te)


def test_bad_arguments():
    k_tr, k_te, k_tt = forms(theta_all(), "trace")
    y = np.ones(N)
    with pytest.raises(KernelInputError, match="diag_reg"):
        gradient_descent_mse(k_tr, y, diag_reg=-1.0)
    with pytest.raises(KernelInputError, match="learning_rate"):
        gradient_descent_mse(k_tr, y, learning_rate=0.0)
    with pytest.raises(KernelInputError, match=r"expected labels \[16\]"):
        gradient_descent_mse(k_tr, np.ones(N + 1))
    predict = gradient_descent_mse(k_tr, y)
    with pytest.raises(KernelInputError, match="non-negative"):
        predict(-1.0, k_te)
    with pytest.raises(KernelInputError, match="k_test_train"):
        predict(1.0, k_test_test=k_tt)
    with pytest.raises(KernelInputError, match="diagonal of shape"):
        predict(1.0, k_te, k_test_test=np.ones(M + 1))
