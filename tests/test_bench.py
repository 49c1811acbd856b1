"""Smoke tests of the benchmark suite's sections at tiny sizes (real runs)."""

from __future__ import annotations

import json
import os

import pytest

from ntkdist import bench
from ntkdist._bench._kernel import supports_cache
from ntkdist.kernels import STRATEGIES


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--json", str(out), "--dir", str(tmp_path)]) == 0
    with open(out) as f:
        return json.load(f)


def _scratch_left(tmp_path) -> list[str]:
    return sorted(p for p in os.listdir(tmp_path) if p != "bench.json")


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown sections"):
        bench.main(["--sections", "tiles,nope", "--json", str(tmp_path / "b.json")])


@pytest.mark.slow
def test_tiles_auto_contraction_sections(tmp_path):
    r = _run(
        tmp_path,
        "--quick",
        "--sections",
        "tiles,auto,contraction",
        "--cases",
        "mlp-w256",
        "--tiles",
        "16",
        "--contraction-tiles",
        "32",
        "--repeats",
        "1",
    )
    assert r["gemm_flops_per_s"] > 0
    assert r["sections"] == ["tiles", "auto", "contraction"]
    tiles = r["results"]
    assert {(t["strategy"], t["output"]) for t in tiles} == {
        (s, o) for s in STRATEGIES for o in ("full", "trace")
    }
    for t in tiles:
        assert t["seconds"] > 0 and t["xla_flops"] > 0 and t["fraction_of_gemm"] > 0
    assert len(r["auto"]) == 2
    for a in r["auto"]:
        assert a["auto"] in STRATEGIES and a["compute_auto"] in STRATEGIES
        assert set(a["seconds"]) == set(STRATEGIES)
        assert a["best"] == min(a["seconds"], key=a["seconds"].get)
        assert a["ratio"] == pytest.approx(
            a["seconds"][a["auto"]] / min(a["seconds"].values())
        )
        assert a["ratio"] >= 1.0
        assert a["goal_met"] == (a["ratio"] <= 1.2)
        # auto's figures are the tiles section's measurements, not new ones
        same = next(
            t for t in tiles if (t["strategy"], t["output"]) == (a["auto"], a["output"])
        )
        assert a["seconds"][a["auto"]] == same["seconds"]
    assert {(c["tile"], c["output"]) for c in r["contraction"]} == {
        (32, "full"),
        (32, "trace"),
    }
    for c in r["contraction"]:
        assert c["xla_flops"] > 0 and c["fraction_of_gemm"] > 0
        assert c["factors_seconds"] > 0 and c["fused_tile_seconds"] > 0
        assert c["goal_met"] == (c["fraction_of_gemm"] >= 0.7)
    # full contracts O² = 100 output pairs per sample pair, trace one sum
    by = {c["output"]: c for c in r["contraction"]}
    assert by["full"]["xla_flops"] > by["trace"]["xla_flops"]


def _check_kernel_rows(rows: list[dict], n: int, outputs: tuple[str, ...]) -> None:
    assert [k["output"] for k in rows] == list(outputs)
    for k in rows:
        assert k["n"] == n and k["tiles_done"] == k["tiles"]
        g = -(-n // k["tile"])
        assert k["tiles"] == g * (g + 1) // 2  # symmetric: upper triangle
        assert k["naive_tile"] == k["tile"]
        assert k["naive_tiles"] == g * g  # naive: both triangles
        assert k["checked_tiles"], "no naive tile was compared with the store"
        assert k["max_relative_error"] <= 1e-5  # naive and ntkdist agree
        assert k["bytes_written"] >= k["plan_bytes_on_disk"]
        assert k["speedup"] == pytest.approx(k["naive_seconds"] / k["seconds"])
        assert k["fraction_of_gemm"] > 0 and k["naive_fraction_of_gemm"] > 0
        assert k["plan_predicted_seconds"] > 0


def test_kernel_section_serial(tmp_path):
    cache = ["--cache", "none"] if supports_cache() else []
    r = _run(
        tmp_path,
        "--sections",
        "kernel",
        "--n",
        "200",
        "--executor",
        "serial",
        "--check-tiles",
        "2",
        *cache,
    )
    _check_kernel_rows(r["kernel"], 200, ("full", "trace"))
    if cache:  # passed through to ntkdist.compute
        assert [k["cache_used"] for k in r["kernel"]] == ["none", "none"]
    assert _scratch_left(tmp_path) == []  # the stores were removed


@pytest.mark.slow
@pytest.mark.cluster
def test_kernel_section_dask(tmp_path):
    r = _run(
        tmp_path,
        "--sections",
        "kernel",
        "--n",
        "256",
        "--kernel-outputs",
        "trace",
        "--workers",
        "2",
    )
    _check_kernel_rows(r["kernel"], 256, ("trace",))
    assert r["kernel"][0]["workers"] == 2
    assert _scratch_left(tmp_path) == []


def _check_ooc(r: dict, tmp_path) -> None:
    o = r["ooc"]
    assert o["killed"], "the first run finished before the kill"
    assert o["survivors_of_kill"] == []
    assert 0 < o["tiles_done_before_kill"] < o["tiles"]
    assert o["tiles_computed_after"] == o["tiles"] - o["tiles_done_before_kill"]
    assert o["complete"] and o["tiles_done"] == o["tiles"]
    assert o["second_run"]["returncode"] == 0
    assert o["checks"] and o["checks_passed"]
    assert (o["checksum_holes"], o["checksum_corrupt"]) == (0, 0)
    assert o["bytes_on_disk"] >= o["plan_bytes_on_disk"]
    assert o["peak_rss_sum"] > 0 and o["max_process_hwm"] > 0
    assert o["sum_process_hwm"] >= o["max_process_hwm"]
    assert o["total_seconds"] == pytest.approx(
        o["first_run"]["seconds"] + o["second_run"]["seconds"]
    )
    assert o["removed"] and not o["store_exists_after"]
    assert _scratch_left(tmp_path) == []


@pytest.mark.slow
def test_ooc_section_killed_resumed_serial(tmp_path):
    r = _run(
        tmp_path,
        "--sections",
        "ooc",
        "--ooc-n",
        "2048",
        "--ooc-tile",
        "64",
        "--executor",
        "serial",
        "--kill-at",
        "0.2",
        "--verify-checksums",
    )
    _check_ooc(r, tmp_path)


@pytest.mark.slow
@pytest.mark.cluster
def test_ooc_section_killed_resumed_dask(tmp_path):
    r = _run(
        tmp_path,
        "--sections",
        "ooc",
        "--ooc-n",
        "4096",
        "--ooc-tile",
        "256",
        "--workers",
        "2",
        "--kill-at",
        "0.2",
        "--verify-checksums",
    )
    _check_ooc(r, tmp_path)
    # the CLI, its workers and their nannies were all watched
    assert r["ooc"]["first_run"]["peak_processes"] >= 3


@pytest.mark.slow
def test_real_section_resnet_tile_and_engine(tmp_path):
    """The ``real`` section: a ResNet-18 tile in its own process, and a whole kernel."""
    out = tmp_path / "r.json"
    rc = bench.main(
        [
            "--sections",
            "real",
            "--real-cases",
            "resnet18-cifar-w16",
            "--real-tiles",
            "2",
            "--outputs",
            "trace",
            "--repeats",
            "1",
            "--real-engine",
            "resnet18-cifar-w16:6",
            "--real-plan",
            "resnet18-cifar-w16:40x30",
            "--executor",
            "serial",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    (row,) = result["real"]
    assert row["case"] == "resnet18-cifar-w16" and row["params"] == 701_466
    assert row["strategy"] in STRATEGIES and row["seconds"] > 0
    assert row["peak_rss_bytes"] > row["rss_before_bytes"] > 0
    assert row["plan_worker_bytes"] > 0 and 0 < row["fraction_of_gemm"] < 2
    # XLA's figure of the tile's program, and the peak predicted from it.
    assert row["xla_tile_bytes"] > 0
    assert row["xla_predicted_peak_bytes"] > row["rss_before_bytes"]
    engine = result["real_engine"]
    assert engine["n"] == 6 and engine["tiles"] >= 1 and engine["seconds"] > 0
    assert engine["tiles_per_second"] > 0 and engine["fraction_of_gemm"] > 0
    planned = result["real_plan"]
    assert (planned["n1"], planned["n2"], planned["output"]) == (40, 30, "trace")
    assert planned["tiles"] >= 1 and planned["predicted_seconds"] > 0
    assert "trace 40×30" in planned["text"]
    assert "XLA assigns the tile's programs" in planned["text"]  # compiled


def test_real_models_match_their_descriptions():
    """ResNet-18 (11.2 M parameters) and ViT-tiny (1.8 M) map images to 10 outputs."""
    import jax.numpy as jnp

    from ntkdist._bench._models import REAL_CASES, n_params

    sizes = {"resnet18-cifar": 11_173_962, "vit-tiny": 1_803_466}
    for name, want in sizes.items():
        fn, params, shape = REAL_CASES[name]()
        assert n_params(params) == want
        assert fn(params, jnp.ones((2, *shape), jnp.float32)).shape == (2, 10)
