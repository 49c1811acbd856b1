"""deploy/ recipes, worker set-up and TLS, checked on what they generate and run."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import dask.config
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from distributed import Client, LocalCluster

import ntkdist
from ntkdist import cluster as nc

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def load(name):
    """Import a deploy/ script by path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"deploy_{name}", DEPLOY / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    return nc.write_tls_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca_dir(tmp_path_factory):
    """Certificates from a second, unrelated CA."""
    return nc.write_tls_certificates(tmp_path_factory.mktemp("other-tls"))


def pairs(args):
    """``["--a", "1", "--b", "2"]`` -> ``{"--a": "1", "--b": "2"}`` (flags skipped)."""
    out = {}
    for i, arg in enumerate(args[:-1]):
        if arg.startswith("--") and not args[i + 1].startswith("--"):
            out[arg] = args[i + 1]
    return out


# -- worker set-up ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # CPU default: only the platform.
        ({}, {"JAX_PLATFORMS": "cpu"}),
        # One GPU per worker: CUDA, no preallocation.
        (
            {"gpu": True},
            {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        ),
        # TPU host: all local TPU devices, nothing about CUDA.
        ({"tpu": True}, {"JAX_PLATFORMS": "tpu"}),
        # float64 and a node-local compilation cache.
        (
            {"gpu": True, "x64": True, "compilation_cache_dir": "/scratch/jax"},
            {
                "JAX_PLATFORMS": "cuda",
                "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                "JAX_ENABLE_X64": "1",
                "JAX_COMPILATION_CACHE_DIR": "/scratch/jax",
            },
        ),
        # x64 explicitly off.
        ({"x64": False}, {"JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "0"}),
    ],
)
def test_worker_env(kwargs, expected, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    huge = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert nc.worker_env(**kwargs) == {**expected, **huge}


def test_worker_env_keeps_the_callers_glibc_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert nc.worker_env()["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # opted out
    assert nc.worker_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_worker_env_refuses_two_accelerators():
    with pytest.raises(ValueError, match="one kind of accelerator"):
        nc.worker_env(gpu=True, tpu=True)


def test_worker_env_is_read_by_jax_at_start(tmp_path):
    env = nc.worker_env(x64=True, compilation_cache_dir=tmp_path)
    code = (
        "import jax\n"
        "print(jax.default_backend(), jax.config.jax_enable_x64, "
        "jax.config.jax_compilation_cache_dir)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["cpu", "True", str(tmp_path)]


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [
        (0, 1, "0"),  # a single GPU
        (0, 4, "0,1,2,3"),  # the first worker keeps the natural order
        (3, 4, "3,0,1,2"),  # the last worker wraps around
    ],
)
def test_rotated_visible_devices(index, count, expected):
    assert nc.rotated_visible_devices(index, count) == expected


def test_rotated_visible_devices_refuses_out_of_range():
    with pytest.raises(ValueError, match="outside range"):
        nc.rotated_visible_devices(4, 4)


def test_gpu_worker_args_and_resources_agree():
    args = pairs(nc.worker_args(gpu=True))
    name, count = args["--resources"].split("=")
    assert nc.gpu_resources() == {name: float(count)}
    assert args["--preload"] == "ntkdist.cluster"
    assert "--resources" not in nc.worker_args(gpu=False)


def test_pin_first_device_respects_jax_platforms():
    code = (
        "import jax, ntkdist.cluster as c\n"
        "c.pin_first_device()\n"
        "print(jax.config.values['jax_cuda_visible_devices'])"
    )
    seen = {}
    for platforms in ("cuda", "cpu"):
        seen[platforms] = subprocess.run(
            [sys.executable, "-c", code],
            env={"JAX_PLATFORMS": platforms, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    assert seen == {"cuda": "0", "cpu": "all"}


# -- TLS files --------------------------------------------------------------------


def test_tls_files_and_security(tls_dir):
    names = {p.name for p in tls_dir.iterdir()}
    assert names == {
        f"{stem}{suffix}"
        for stem in ("ca", "scheduler", "worker", "client")
        for suffix in (".pem", "-key.pem")
    }
    for key in tls_dir.glob("*-key.pem"):
        assert key.stat().st_mode & 0o077 == 0
    security = nc.security_from_directory(tls_dir)
    assert security.require_encryption
    assert security.tls_worker_cert == str(tls_dir / "worker.pem")
    client_only = nc.security_from_directory(tls_dir, roles=("client",))
    assert client_only.tls_client_key == str(tls_dir / "client-key.pem")
    assert client_only.tls_worker_cert is None
    # Each leaf certificate verifies against the CA.
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    ctx.load_cert_chain(tls_dir / "client.pem", tls_dir / "client-key.pem")


def test_security_from_directory_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ca\.pem is missing"):
        nc.security_from_directory(tmp_path)


def test_tls_script_writes_the_set(tmp_path):
    assert load("tls").main([str(tmp_path / "certs"), "--host", "10.0.0.7"]) == 0
    nc.security_from_directory(tmp_path / "certs")


# -- SLURM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_script(tls_dir):
    pytest.importorskip("dask_jobqueue", reason="the deploy extra is not installed")
    slurm = load("slurm")
    with slurm.make_cluster(
        tls_dir=str(tls_dir),
        partition="gpu",
        account="ntk",
        x64=True,
        setup=["module load cuda/12"],
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        return cluster.job_script()


def test_slurm_job_requests_one_gpu(slurm_script):
    directives = [ln for ln in slurm_script.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:1" in directives
    assert "#SBATCH -p gpu" in directives
    assert "#SBATCH -A ntk" in directives
    assert "#SBATCH -n 1" in directives  # one worker process per job
    assert "#SBATCH --cpus-per-task=8" in directives  # the default cores


def test_slurm_worker_carries_resource_preload_and_tls(slurm_script, tls_dir):
    command = shlex.split(slurm_script.strip().splitlines()[-1])
    assert command[1:3] == ["-m", "distributed.cli.dask_worker"]
    assert command[3].startswith("tls://127.0.0.1:")
    args = pairs(command)
    assert args["--resources"] == "GPU=1"
    assert args["--nthreads"] == "1"  # one tile at a time on the job's GPU
    assert args["--preload"] == "ntkdist.cluster"
    assert args["--tls-ca-file"] == str(tls_dir / "ca.pem")
    assert args["--tls-cert"] == str(tls_dir / "worker.pem")
    assert args["--tls-key"] == str(tls_dir / "worker-key.pem")


def test_slurm_prologue_sets_the_jax_environment(slurm_script):
    lines = slurm_script.strip().splitlines()
    body = [ln for ln in lines[:-1] if ln and not ln.startswith("#")]
    assert body[0] == "module load cuda/12"  # set-up runs before the exports
    exports = "\n".join(ln for ln in body if ln.startswith("export "))
    names = (
        "JAX_PLATFORMS",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "JAX_ENABLE_X64",
        "JAX_COMPILATION_CACHE_DIR",
    )
    shell = exports + "\n" + "".join(f'echo "{n}=${n}"\n' for n in names)
    got = subprocess.run(
        ["bash", "-c", shell],
        env={"TMPDIR": "/node-local", "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert got == [
        "JAX_PLATFORMS=cuda",
        "XLA_PYTHON_CLIENT_PREALLOCATE=false",
        "JAX_ENABLE_X64=1",
        "JAX_COMPILATION_CACHE_DIR=/node-local/ntkdist-jax-cache",
    ]


def test_slurm_cli_dry_run_prints_the_script(tls_dir, capsys):
    slurm = load("slurm")
    argv = [
        "--tls-dir",
        str(tls_dir),
        "--host",
        "127.0.0.1",
        "--dashboard-address",
        ":0",
        "--dry-run",
    ]
    assert slurm.main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script


def test_slurm_cli_requires_a_tls_choice():
    with pytest.raises(SystemExit):
        load("slurm").main(["--dry-run"])


# -- Kubernetes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def daskcluster():
    return yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())


def container(spec, role):
    [c] = spec["spec"][role]["spec"]["containers"]
    return c


def test_k8s_workers_request_one_gpu_and_the_gpu_resource(daskcluster):
    assert daskcluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert daskcluster["kind"] == "DaskCluster"
    worker = container(daskcluster, "worker")
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    args = pairs(worker["args"])
    assert args["--resources"] == "GPU=1"
    assert args["--preload"] == "ntkdist.cluster"
    assert "nvidia.com/gpu" not in container(daskcluster, "scheduler")["resources"].get(
        "limits", {}
    )


def test_k8s_worker_env_is_the_gpu_worker_env(daskcluster, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = {e["name"]: e["value"] for e in container(daskcluster, "worker")["env"]}
    jax_env = {k: v for k, v in env.items() if k.startswith(("JAX_", "XLA_", "GLIBC_"))}
    assert jax_env == nc.worker_env(gpu=True, compilation_cache_dir="/cache/jax")
    name = daskcluster["metadata"]["name"]
    assert env["DASK_SCHEDULER_ADDRESS"] == f"tls://{name}-scheduler:8786"


def test_k8s_tls_files_come_from_the_mounted_secret(daskcluster):
    for role in ("scheduler", "worker"):
        pod = daskcluster["spec"][role]["spec"]
        c = container(daskcluster, role)
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == "ntkdist-tls"
        assert volume["secret"]["defaultMode"] == 0o400
        assert mount["readOnly"] is True
        args = pairs(c["args"])
        base = mount["mountPath"]
        assert args["--tls-ca-file"] == f"{base}/ca.pem"
        assert args["--tls-cert"] == f"{base}/{role}.pem"
        assert args["--tls-key"] == f"{base}/{role}-key.pem"
        env = {e["name"]: e["value"] for e in c["env"]}
        config = dask.config.collect_env(env)
        assert dask.config.get("distributed.comm.require-encryption", config=config)
    assert pairs(container(daskcluster, "scheduler")["args"])["--protocol"] == "tls"


def test_k8s_spec_has_the_operator_layout(daskcluster):
    operator = pytest.importorskip("dask_kubernetes.operator")
    reference = operator.make_cluster_spec(name="ntkdist", image="ntkdist:latest")
    assert (
        daskcluster["spec"]["scheduler"]["service"]["selector"]
        == (reference["spec"]["scheduler"]["service"]["selector"])
    )
    ours = {p["name"]: p for p in daskcluster["spec"]["scheduler"]["service"]["ports"]}
    for port in reference["spec"]["scheduler"]["service"]["ports"]:
        assert ours[port["name"]]["port"] == port["port"]
    assert set(reference["spec"]) <= set(daskcluster["spec"])


def key_paths(tree, prefix=()):
    """Every path of dict keys in a JSON-like tree (list positions included)."""
    items = (
        tree.items()
        if isinstance(tree, dict)
        else (enumerate(tree) if isinstance(tree, list) else ())
    )
    paths = set()
    for key, value in items:
        paths |= {(*prefix, key)} | key_paths(value, (*prefix, key))
    return paths


def test_k8s_pod_specs_have_no_unknown_fields(daskcluster):
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    service = daskcluster["spec"]["scheduler"]["service"]
    objects = [
        (daskcluster["spec"][r]["spec"], "V1PodSpec") for r in ("scheduler", "worker")
    ]
    for obj, kind in [*objects, (service, "V1ServiceSpec")]:
        model = api.deserialize(json.dumps(obj), kind, "application/json")
        # The client drops fields its models do not know: a misspelt key shows here.
        assert key_paths(api.sanitize_for_serialization(model)) == key_paths(obj)


# -- Dockerfile -------------------------------------------------------------------


def test_dockerfile_installs_cuda_jax_and_copies_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
    assert any(ln.startswith("FROM ") for ln in lines)
    assert 'pip install "jax[${JAX_CUDA}]==${JAX_VERSION}"' in text
    assert "ARG JAX_CUDA=cuda12" in lines
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in text
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    sources = {source for group in copies for source in group}
    # What a pip install of the project reads: its metadata, readme and package.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sources == {"pyproject.toml", project["readme"], "src"}
    assert (ROOT / "src" / "ntkdist" / "__init__.py").is_file()
    assert any(ln.startswith('RUN pip install ".${EXTRAS}"') for ln in lines)


# -- single node, several GPUs --------------------------------------------------------


def test_multi_gpu_node_needs_a_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    node = load("multi_gpu_node")
    assert node.visible_gpus() == 0
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        node.make_cluster(tls_dir=None)


def _worker_view():
    import os

    import jax

    return (
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        os.environ.get("JAX_PLATFORMS"),
        os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        jax.config.values["jax_cuda_visible_devices"],
    )


@pytest.mark.cluster
def test_multi_gpu_node_layout_without_dask_cuda(tls_dir):
    """Two 'GPU' workers (no GPU needed: JAX's backend is never started)."""
    node = load("multi_gpu_node")
    with (
        # On a machine with fewer than two GPUs, distributed's NVML monitor
        # would look up the absent device "1" and stop the nanny.
        dask.config.set({"distributed.diagnostics.nvml": False}),
        node.make_cluster(tls_dir=str(tls_dir), n_gpus=2, use_dask_cuda=False) as cl,
        Client(cl, security=cl.security) as client,
    ):
        client.wait_for_workers(2)
        views = sorted(client.run(_worker_view).values())
        resources = [
            w["resources"] for w in client.scheduler_info()["workers"].values()
        ]
    assert views == [("0,1", "cuda", "false", "0"), ("1,0", "cuda", "false", "0")]
    assert resources == [{"GPU": 1}, {"GPU": 1}]


# -- TLS on a running cluster -----------------------------------------------------


def _sum_of_squares(n):
    import jax.numpy as jnp

    return float(jnp.sum(jnp.arange(n, dtype=jnp.float32) ** 2))


def _talk(ctx, raw):
    """Handshake, write, read: the server's refusal surfaces in one of them
    (with TLS 1.3, after the client's side of the handshake has finished)."""
    with ctx.wrap_socket(raw) as tls:
        tls.sendall(b"\0" * 8)
        tls.recv(1)


def assert_refused(address, tls_dir, other_ca_dir):
    """No certificates, a foreign CA's, or a CA but no client certificate: refused."""
    with pytest.raises(TypeError, match="TLS expects"):
        Client(address, timeout="3s")
    foreign = nc.security_from_directory(other_ca_dir, roles=("client",))
    with pytest.raises(OSError, match=r"TLS certificate does not match|[Tt]imed out"):
        Client(address, security=foreign, timeout="3s")
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    ctx.check_hostname = False
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        _talk(ctx, raw)


def test_tls_cluster_runs_jax_and_refuses_strangers(tls_dir, other_ca_dir):
    security = nc.security_from_directory(tls_dir)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tls://",
            host="127.0.0.1",
            security=security,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, security=security) as client,
    ):
        assert cluster.scheduler_address.startswith("tls://")
        assert client.submit(_sum_of_squares, 4).result() == 14.0
        assert_refused(cluster.scheduler_address, tls_dir, other_ca_dir)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


@pytest.mark.cluster
def test_tls_process_cluster_computes_the_kernel(tls_dir, other_ca_dir, tmp_path):
    security = nc.security_from_directory(tls_dir)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3))
    params = {"w1": rng.normal(size=(3, 5)), "w2": rng.normal(size=(5, 2))}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            protocol="tls://",
            host="127.0.0.1",
            security=security,
            env=nc.worker_env(x64=True),
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, security=security) as client,
    ):
        client.register_plugin(nc.JaxDevicePlugin(x64=True))
        assert list(client.run(nc.local_devices).values()) == [["cpu:0"]] * 2
        store = ntkdist.compute(
            _mlp,
            params,
            x,
            store=tmp_path / "k.zarr",
            output="trace",
            tile=4,
            client=client,
            progress=False,
        )
        assert_refused(cluster.scheduler_address, tls_dir, other_ca_dir)
    want = ntkdist.ntk(_mlp, params, x, output="trace")
    assert store.complete
    np.testing.assert_allclose(np.asarray(store.kernel[...]), want, rtol=1e-12)


# -- GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.cluster
def test_one_worker_per_gpu_computes_the_kernel(tls_dir, tmp_path):
    from ntkdist.executors import DaskExecutor

    node = load("multi_gpu_node")
    has_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    n = len(jax.devices("gpu"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    params = {
        "w1": rng.normal(size=(8, 32)).astype(np.float32),
        "w2": rng.normal(size=(32, 4)).astype(np.float32),
    }
    with (
        node.make_cluster(tls_dir=str(tls_dir), use_dask_cuda=has_dask_cuda) as cl,
        Client(cl, security=cl.security) as client,
    ):
        client.wait_for_workers(n)
        views = client.run(_worker_view)
        devices = client.run(nc.local_devices)
        store = ntkdist.compute(
            _mlp,
            params,
            x,
            store=tmp_path / "k.zarr",
            output="trace",
            tile=16,
            executor=DaskExecutor(client, resources=nc.gpu_resources()),
            progress=False,
        )
    assert len(devices) == n
    assert all(len(d) == 1 and d[0].startswith("gpu") for d in devices.values())
    # Each worker's first visible device is a different physical GPU.
    assert len({v[0].split(",")[0] for v in views.values()}) == n
    want = ntkdist.ntk(_mlp, params, x, output="trace")
    # float32 on two devices: entries near zero carry the large ones' rounding.
    np.testing.assert_allclose(
        np.asarray(store.kernel[...]), want, rtol=1e-4, atol=1e-6 * np.abs(want).max()
    )


# -- the command line over TLS ------------------------------------------------------

MODEL = """
import jax.numpy as jnp
import numpy as np


def apply_fn(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def factory():
    rng = np.random.default_rng(1)
    return apply_fn, {"w1": rng.normal(size=(3, 5)), "w2": rng.normal(size=(5, 2))}
"""


def test_tls_env_is_what_distributed_reads(tls_dir):
    code = (
        "from distributed import Security\n"
        "s = Security()\n"
        "print(s.require_encryption, s.tls_ca_file, s.tls_client_cert, "
        "s.tls_client_key)"
    )
    env = {**nc.tls_env(tls_dir), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [
        "True",
        str(tls_dir / "ca.pem"),
        str(tls_dir / "client.pem"),
        str(tls_dir / "client-key.pem"),
    ]
    with pytest.raises(ValueError, match="not one of"):
        nc.tls_env(tls_dir, role="admin")


@pytest.mark.cluster
def test_cli_computes_over_tls_only_with_the_client_certificate(
    tls_dir, tmp_path, monkeypatch
):
    # The model is a module that both the CLI and the (in-process) worker import,
    # as on a real cluster where the model's package is installed on the workers.
    (tmp_path / "ntkdist_tls_cli_model.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    x = np.random.default_rng(2).normal(size=(9, 3))
    np.save(tmp_path / "x.npy", x)
    security = nc.security_from_directory(tls_dir)
    base_env = {
        "PATH": os.environ.get("PATH", ""),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(tmp_path),
    }

    def cli(store, env):
        command = [
            sys.executable,
            "-m",
            "ntkdist",
            "compute",
            "ntkdist_tls_cli_model:factory",
            "--x1",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / store),
            "--output",
            "trace",
            "--tile",
            "4",
            "--scheduler",
            address,
            "--quiet",
        ]
        return subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, timeout=120
        )

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tls://",
        host="127.0.0.1",
        security=security,
        dashboard_address=":0",
    ) as cluster:
        address = cluster.scheduler_address
        refused = cli("refused.zarr", base_env)
        done = cli("k.zarr", {**base_env, **nc.tls_env(tls_dir)})
    assert refused.returncode != 0
    assert "TLS" in refused.stderr
    assert done.returncode == 0, done.stderr
    ns = {}
    exec(MODEL, ns)
    apply_fn, params = ns["factory"]()
    want = ntkdist.ntk(apply_fn, params, x, output="trace")
    got = np.asarray(ntkdist.open(tmp_path / "k.zarr").kernel[...])
    np.testing.assert_allclose(got, want, rtol=1e-12)


# -- stores hold no pickles ------------------------------------------------------


def test_opening_a_store_never_unpickles(tmp_path, monkeypatch):
    import pickle

    x = np.random.default_rng(3).normal(size=(6, 3))
    params = {"w1": np.ones((3, 4)) / 2, "w2": np.ones((4, 2)) / 3}
    path = tmp_path / "k.zarr"
    ntkdist.compute(
        _mlp,
        params,
        x,
        store=path,
        output="full",
        tile=4,
        executor="serial",
        progress=False,
    )
    metadata = list(path.rglob("zarr.json"))
    assert metadata
    for meta in metadata:
        text = meta.read_text()
        json.loads(text)  # JSON, nothing else
        assert "pickle" not in text.lower()

    def refuse(*args, **kwargs):
        raise AssertionError("a store must not be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    store = ntkdist.open(path)
    np.testing.assert_allclose(
        np.asarray(store.kernel[...]), ntkdist.ntk(_mlp, params, x), rtol=1e-12
    )


def test_one_worker_set_up_for_launchers_and_the_engine():
    """The engine's plugin and the launchers' are one class, pinning one way."""
    from ntkdist.executors import JaxDevicePlugin, JaxWorkerPlugin

    assert nc.JaxDevicePlugin is JaxDevicePlugin
    engine = JaxWorkerPlugin(x64=True)
    assert isinstance(engine, JaxDevicePlugin) and engine.x64 is True
    assert engine.name != nc.JaxDevicePlugin(gpu=True).name  # both may be registered
