"""What the engine tests share: a small MLP with biases and a two-process cluster."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from distributed import LocalCluster


def mlp(p: Any, x: Any) -> Any:
    """tanh(x W1 + b1) W2 + b2."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def make_params(
    seed: int = 0, d: int = 4, width: int = 24, o: int = 3, out_scale: float = 5
) -> dict[str, np.ndarray]:
    """float64 params of :func:`mlp`."""
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(d, width)) / 2,
        "b1": rng.normal(size=width),
        "w2": rng.normal(size=(width, o)) / out_scale,
        "b2": rng.normal(size=o),
    }


def two_worker_cluster() -> LocalCluster:
    """Two single-threaded CPU worker processes computing in float64."""
    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        env={
            "JAX_PLATFORMS": "cpu",
            "JAX_ENABLE_X64": "1",
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        },
    )
