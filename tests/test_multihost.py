"""Multi-host for real: scheduler and workers in separate network namespaces.

The test builds a small network on this machine: a bridge in the root
namespace and one namespace per host (the scheduler ``s`` and workers ``a``
and ``b``), each joined to the bridge by a veth pair. The client (this
process) reaches them over the bridge, as it would reach other machines; only
the file system is shared, as on a cluster with a shared store. Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN) and ``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from distributed import Client, get_task_stream

import ntkdist
from ntkdist.storage import KernelStore

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
PORT = 8786


def _ip(*args, ns=None, check=True):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    cmd = [*prefix, "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _netns_unavailable():
    """Why namespaces cannot be made here, or ``None`` when they can."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"ntkprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces ({made.stderr.strip()}); needs root"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


class Hosts:
    """Three namespaces on a bridge: scheduler ``s``, workers ``a`` and ``b``."""

    def __init__(self):
        self.id = secrets.token_hex(2)
        self.subnet = f"10.213.{int(self.id, 16) % 250 + 1}"
        self.bridge = f"nkb{self.id}"
        self.addr = {
            "s": f"{self.subnet}.2",
            "a": f"{self.subnet}.3",
            "b": f"{self.subnet}.4",
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def ns(self, host):
        return f"ntk-{self.id}-{host}"

    def link(self, host):
        """The root-namespace end of ``host``'s cable."""
        return f"nk{self.id}{host}"

    def build(self):
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host, addr in self.addr.items():
            ns, outer, inner = self.ns(host), self.link(host), self.link(host) + "p"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{addr}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)

    def start(self, host, args, log_dir):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "JAX_PLATFORMS": "cpu",
            "JAX_ENABLE_X64": "1",
            # A worker whose link is cut is declared dead after this long.
            "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
        }
        log = open(log_dir / f"{host}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs[host] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), sys.executable, "-m", *args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def cut(self, host):
        _ip("link", "set", self.link(host), "down")

    def teardown(self):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for host in self.addr:
            subprocess.run(
                ["ip", "netns", "del", self.ns(host)], check=False, capture_output=True
            )
            subprocess.run(
                ["ip", "link", "del", self.link(host)], check=False, capture_output=True
            )
        subprocess.run(
            ["ip", "link", "del", self.bridge], check=False, capture_output=True
        )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    net = Hosts()
    logs = tmp_path_factory.mktemp("hosts")
    try:
        net.build()
        scheduler = f"tcp://{net.addr['s']}:{PORT}"
        net.start(
            "s",
            [
                "distributed.cli.dask_scheduler",
                "--host",
                net.addr["s"],
                "--port",
                str(PORT),
                "--no-dashboard",
            ],
            logs,
        )
        for host in ("a", "b"):
            net.start(
                host,
                [
                    "distributed.cli.dask_worker",
                    scheduler,
                    "--host",
                    net.addr[host],
                    "--name",
                    host,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--no-nanny",
                ],
                logs,
            )
        yield net, scheduler
    finally:
        net.teardown()


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _job(n):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 6))
    params = {
        "w1": rng.normal(size=(6, 32)) / 6**0.5,
        "w2": rng.normal(size=(32, 3)) / 32**0.5,
    }
    return x, params


def _worker_hosts(client):
    return {w["name"]: w["host"] for w in client.scheduler_info()["workers"].values()}


def test_kernel_across_hosts_equals_ntk(hosts, tmp_path):
    net, scheduler = hosts
    x, params = _job(40)
    with Client(scheduler, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
        assert _worker_hosts(client) == {"a": net.addr["a"], "b": net.addr["b"]}
        with get_task_stream(client) as stream:
            store = ntkdist.compute(
                _mlp,
                params,
                x,
                store=tmp_path / "k.zarr",
                output="full",
                tile=8,
                client=client,
                progress=False,
            )
    ran_on = {
        t["worker"].split("://")[1].rsplit(":", 1)[0]
        for t in stream.data
        if str(t["key"]).startswith("ntk-")
    }
    assert ran_on == {net.addr["a"], net.addr["b"]}  # both hosts computed tiles
    want = ntkdist.ntk(_mlp, params, x, output="full")
    np.testing.assert_allclose(np.asarray(store.kernel[...]), want, rtol=1e-12)


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_job_completes_when_a_worker_link_is_cut(hosts, tmp_path):
    net, scheduler = hosts
    x, params = _job(240)
    path = tmp_path / "k.zarr"
    result: dict[str, object] = {}

    def compute(client):
        return ntkdist.compute(
            _mlp,
            params,
            x,
            store=path,
            output="trace",
            tile=12,
            client=client,
            progress=False,
        )

    def run(client):
        try:
            result["store"] = compute(client)
        except Exception as err:  # reported below, after the resumed run
            result["error"] = err

    with Client(scheduler, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
        job = threading.Thread(target=run, args=(client,))
        job.start()
        done_at_cut, total = None, None
        deadline = time.monotonic() + 120
        while done_at_cut is None and time.monotonic() < deadline:
            try:
                done, total = KernelStore.open(path).progress()
            except Exception:  # the store is not created yet
                done = 0
            if done >= 5:
                net.cut("a")
                done_at_cut = done
            time.sleep(0.05)
        job.join(timeout=300)
        assert not job.is_alive(), "the job hung after the cut"
        assert done_at_cut is not None, "the run never got going"
        assert done_at_cut < total  # the cut came mid-run
        # The scheduler drops the unreachable worker (worker-ttl 5 s) ...
        assert _wait_for(lambda: set(_worker_hosts(client)) == {"b"}, timeout=60)
        error = result.get("error")
        if error is not None:
            # ... and running the same job again finishes it on the other host.
            result["store"] = compute(client)
    store = result["store"]
    assert store.complete
    want = ntkdist.ntk(_mlp, params, x, output="trace")
    np.testing.assert_allclose(np.asarray(store.kernel[...]), want, rtol=1e-12)
    # The lost worker's tiles were run again on the other host: one run finished.
    assert error is None, f"the job failed after the cut: {error!r}"
