"""On a GPU: float32 kernels are float32-accurate, and the embedded cluster
puts one worker on each GPU. Skipped where JAX has no GPU backend (run with
``JAX_PLATFORMS=cuda,cpu`` so the float64 reference can run on the CPU)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed import Client

import ntkdist
from ntkdist.cluster import local_devices
from ntkdist.executors._dask import default_workers, gpu_cluster
from ntkdist.executors._workers import local_gpus

pytestmark = pytest.mark.gpu


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return h @ p["w3"]


def make(d=64, width=512, o=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(size=(d, width)) / d**0.5).astype(np.float32),
        "b1": (rng.normal(size=width) * 0.1).astype(np.float32),
        "w2": (rng.normal(size=(width, width)) / width**0.5).astype(np.float32),
        "b2": (rng.normal(size=width) * 0.1).astype(np.float32),
        "w3": (rng.normal(size=(width, o)) / width**0.5).astype(np.float32),
    }


def _reference(params, x):
    """Plain Jacobian contraction in float64 on the CPU."""
    from ntkdist.testing import reference_ntk

    with jax.default_device(jax.devices("cpu")[0]):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        return np.asarray(reference_ntk(mlp, p64, x.astype(np.float64)))


def _rel(k, ref):
    return float(np.abs(np.asarray(k, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("strategy", ["structured", "jacobian", "ntvp"])
def test_float32_kernel_on_the_gpu_is_float32_accurate(strategy):
    params = make()
    x = np.random.default_rng(1).normal(size=(48, 64)).astype(np.float32)
    ref = _reference(params, x)
    k = ntkdist.ntk(mlp, params, x, strategy=strategy)
    assert k.dtype == np.float32
    assert _rel(k, ref) < 1e-5
    fast = ntkdist.ntk(mlp, params, x, strategy=strategy, precision="tensorfloat32")
    assert _rel(fast, ref) >= _rel(k, ref)


def test_embedded_cluster_runs_one_worker_per_gpu(tmp_path):
    gpus = local_gpus()
    assert len(gpus) == len(jax.devices("gpu")) == default_workers()
    with gpu_cluster(gpus, x64=False) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(gpus))
        seen = client.run(local_devices)
        env = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert all(d == ["gpu:0"] for d in seen.values()), seen
    assert sorted(env.values()) == sorted(gpus)
    params = make(width=128)
    x = np.random.default_rng(2).normal(size=(100, 64)).astype(np.float32)
    store = ntkdist.compute(
        mlp, params, x, store=tmp_path / "k.zarr", tile=32, progress=False
    )
    assert store.complete
    assert store.plan.workers == len(gpus)
    ref = _reference(params, x)
    assert _rel(store.kernel[...], ref) < 1e-5
