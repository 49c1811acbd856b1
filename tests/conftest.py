"""Test configuration: float64, two CPU devices, and the slow/cluster/gpu markers."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_enable_x64", True)
with contextlib.suppress(AttributeError, RuntimeError):  # backend already started
    jax.config.update("jax_num_cpu_devices", 2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption(
        "--run-cluster",
        action="store_true",
        help="run tests that start multi-process Dask clusters",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    skip_cluster = pytest.mark.skip(reason="cluster: pass --run-cluster to run")
    has_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="gpu: no GPU backend on this machine")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "cluster" in item.keywords and not config.getoption("--run-cluster"):
            item.add_marker(skip_cluster)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_dask_config():
    """A Client sets dask's default scheduler globally; undo it after each test."""
    import copy

    import dask.config

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)
