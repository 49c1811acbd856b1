"""Benchmark of the engine: overhead, symmetric savings, worker memory vs plan.

Run ``python -m ntkdist._engine_bench [--quick] [--sections a,b]``; sections:

- **overhead**: the same tiles (about 1 s each) computed (a) through
  ``ntkdist.compute`` on a one-worker Dask cluster into Zarr, and (b) in a plain
  in-process loop with no Dask or Zarr (both with the strategy's plain
  ``tile``, and with the engine's own cached-factor tile function). The
  engine runs on a warm cluster into the same store path each repeat; the
  previous repeat's store is deleted before its clock starts (that time is
  ``old_store_delete_s``, about 0.4 s for the 2.7 GB ``full`` store), so
  ``engine_warm_s`` is a compute into a fresh path, everything else included.
  ``engine_cpu_s`` (CPU seconds of the coordinator and the worker) against
  ``loop_naive_cpu_s`` is the figure other load on the machine disturbs least.
- **symmetric**: ``x2=None`` versus the same kernel as a rectangular job.
- **memory**: peak resident memory of each worker (``VmHWM``) against the
  plan's ``peak_bytes_per_worker``, for ``trace`` of a small MLP at N = 2k, 8k
  and 32k, each on a fresh two-worker cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import ntkdist
from ntkdist._hugepages import reexec_with_huge_pages
from ntkdist._planner import format_bytes


def make_mlp(d: int, width: int, out: int, depth: int = 2, seed: int = 0) -> Any:
    """A tanh MLP: ``(apply_fn, params)``."""
    rng = np.random.default_rng(seed)
    sizes = [d] + [width] * depth + [out]
    params = [
        {"w": rng.normal(size=(a, b)) / np.sqrt(a), "b": 0.1 * rng.normal(size=b)}
        for a, b in itertools.pairwise(sizes)
    ]

    def apply_fn(p: Any, x: jax.Array) -> jax.Array:
        for layer in p[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    return apply_fn, params


def peak_rss() -> int:
    """This process's peak resident bytes since it started (``VmHWM``).

    Not ``ru_maxrss``: on Linux that survives ``exec``, so a spawned worker
    would report the peak of the process it was forked from.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def calibrate_tile(model: Any, p: Any, d: int, output: str, seconds: float) -> int:
    """A tile side whose structured tile takes about ``seconds`` here."""
    from ..kernels import get

    strategy, tile = get("structured"), 64
    rng = np.random.default_rng(0)
    while True:
        xa = jnp.asarray(rng.normal(size=(tile, d)))
        strategy.tile(model, p, xa, xa[::-1], output).block_until_ready()
        t0 = time.perf_counter()
        strategy.tile(model, p, xa, xa[::-1], output).block_until_ready()
        dt = time.perf_counter() - t0
        if dt > 0.7 * seconds or tile >= 2048:
            return tile
        tile = int(tile * min(2.0, max(1.1, (seconds / dt) ** 0.5)))


def _cpu_seconds() -> float:
    """CPU seconds (user and system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cluster(n_workers: int) -> Any:
    from distributed import Client, LocalCluster

    from ..executors._dask import THREADS_PER_WORKER
    from ..executors._workers import jax_worker_env

    cluster = LocalCluster(  # as the embedded cluster of ntkdist.compute
        n_workers=n_workers,
        threads_per_worker=THREADS_PER_WORKER,
        processes=True,
        dashboard_address=":0",
        env=jax_worker_env(True),
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


def bench_overhead(
    tmp: str, quick: bool, output: str, repeat: int = 3
) -> dict[str, float]:
    """Engine (Dask + Zarr, 1 worker) vs plain in-process loops over the same tiles."""
    tmp = tempfile.mkdtemp(prefix=f"overhead-{output}-", dir=tmp)
    from ..executors import InputSource, TileSpec, compute_block
    from ..kernels import get

    f, p = make_mlp(d=32, width=256, out=10)
    strategy = get("structured")
    model = ntkdist.Model(f)
    grid = 2 if quick else 4
    tile = calibrate_tile(model, p, 32, output, 1.0)
    rng = np.random.default_rng(0)
    n = grid * tile
    x1, x2 = rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    plan = ntkdist.plan(f, p, x1, x2, output=output, strategy="structured", tile=tile)
    tiles = plan.tiles()

    def naive_loop() -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        for t in tiles:
            k = strategy.tile(
                model,
                p,
                jnp.asarray(x1[t.rows[0] : t.rows[1]]),
                jnp.asarray(x2[t.cols[0] : t.cols[1]]),
                output,
            )
            np.asarray(k)
        cpu["naive"] = time.process_time() - c0  # all of its threads
        return time.perf_counter() - t0

    cpu: dict[str, float] = {}
    naive_loop()  # compile

    # The engine's tile function, in process, reading inputs from Zarr once.
    import zarr

    src = os.path.join(tmp, "inputs.zarr")
    g = zarr.open_group(src, mode="w")
    for name, x in (("x1", x1), ("x2", x2)):
        a = g.create_array(name, shape=x.shape, chunks=(tile, 32), dtype="float64")
        a[...] = x
    spec = TileSpec(
        store=src,
        x1=InputSource(src, "x1"),
        x2=InputSource(src, "x2"),
        output=output,
        strategy=strategy,
        tile_rows=tile,
        tile_cols=tile,
        dtype="float64",
        fingerprint="bench",
    )

    def block_loop() -> float:
        t0 = time.perf_counter()
        for t in tiles:
            compute_block(t, spec, model, p)
        return time.perf_counter() - t0

    block_loop()

    t0 = time.perf_counter()
    cluster, client = _cluster(1)
    t_start = time.perf_counter() - t0
    try:
        # Warm the worker (imports, compilation) on a throwaway store.
        ntkdist.compute(
            f,
            p,
            x1[: 2 * tile],
            x2[: 2 * tile],
            store=os.path.join(tmp, "warm.zarr"),
            output=output,
            strategy="structured",
            tile=tile,
            client=client,
            progress=False,
        )
        # Interleave the three, repeat, keep each one's best: the machine
        # may be shared, and load changes between runs.
        t_naive = t_block = t_engine = float("inf")
        t_delete, cpu_naive, cpu_engine = 0.0, float("inf"), float("inf")
        store = os.path.join(tmp, "overhead.zarr")
        for _ in range(repeat):
            t_naive = min(t_naive, naive_loop())
            cpu_naive = min(cpu_naive, cpu["naive"])
            t_block = min(t_block, block_loop())
            # The previous repeat's store is deleted before the clock starts:
            # the loops write nothing, so discarding an old result is no cost
            # of computing this one (reported apart as old_store_delete_s).
            t0 = time.perf_counter()
            shutil.rmtree(store, ignore_errors=True)
            t_delete = max(t_delete, time.perf_counter() - t0)
            c0 = time.process_time() + sum(client.run(_cpu_seconds).values())
            t0 = time.perf_counter()
            ntkdist.compute(
                f,
                p,
                x1,
                x2,
                store=store,
                output=output,
                strategy="structured",
                tile=tile,
                client=client,
                progress=False,
                overwrite=True,
            )
            t_engine = min(t_engine, time.perf_counter() - t0)
            c1 = time.process_time() + sum(client.run(_cpu_seconds).values())
            cpu_engine = min(cpu_engine, c1 - c0)
        cold = os.path.join(tmp, "cold.zarr")
    finally:
        client.close()
        cluster.close()
    t0 = time.perf_counter()
    ntkdist.compute(
        f,
        p,
        x1,
        x2,
        store=cold,
        output=output,
        strategy="structured",
        tile=tile,
        workers=1,
        progress=False,
    )
    t_cold = time.perf_counter() - t0
    return {
        "tile": tile,
        "tiles": len(tiles),
        "seconds_per_tile": t_naive / len(tiles),
        "loop_naive_s": t_naive,
        "loop_naive_cpu_s": cpu_naive,
        "loop_engine_tile_fn_s": t_block,
        "repeats_best_of": repeat,
        "engine_warm_s": t_engine,
        "old_store_delete_s": t_delete,
        "engine_cold_end_to_end_s": t_cold,
        "cluster_start_s": t_start,
        "overhead_vs_naive": t_engine / t_naive - 1,
        "overhead_vs_same_tile_fn": t_engine / t_block - 1,
        "engine_cpu_s": cpu_engine,
        "cpu_overhead_vs_naive": cpu_engine / cpu_naive - 1,
    }


def bench_symmetric(
    tmp: str, quick: bool, output: str, repeat: int = 3
) -> dict[str, float]:
    """``x2=None`` versus the same kernel computed as a rectangular job."""
    tmp = tempfile.mkdtemp(prefix=f"symmetric-{output}-", dir=tmp)
    f, p = make_mlp(d=32, width=256, out=10)
    tile = calibrate_tile(ntkdist.Model(f), p, 32, output, 0.5)
    n = tile * (4 if quick else 6)
    x = np.random.default_rng(1).normal(size=(n, 32))
    cluster, client = _cluster(2)
    try:
        kw = {
            "output": output,
            "strategy": "structured",
            "tile": tile,
            "client": client,
            "progress": False,
        }
        ntkdist.compute(f, p, x[:tile], store=os.path.join(tmp, "w.zarr"), **kw)
        ntkdist.compute(
            f, p, x[:tile], x[:tile], store=os.path.join(tmp, "w2.zarr"), **kw
        )
        t_sym = t_rect = float("inf")
        for _ in range(repeat):  # interleaved, best of each: load varies
            t0 = time.perf_counter()
            sym = ntkdist.compute(
                f, p, x, store=os.path.join(tmp, "sym.zarr"), overwrite=True, **kw
            )
            t_sym = min(t_sym, time.perf_counter() - t0)
            t0 = time.perf_counter()
            rect = ntkdist.compute(
                f,
                p,
                x,
                x.copy(),
                store=os.path.join(tmp, "rect.zarr"),
                overwrite=True,
                **kw,
            )
            t_rect = min(t_rect, time.perf_counter() - t0)
    finally:
        client.close()
        cluster.close()
    diff = float(np.max(np.abs(sym.kernel[...] - rect.kernel[...])))
    return {
        "n": n,
        "tile": tile,
        "tiles_symmetric": sym.plan.n_tiles,
        "tiles_rectangular": rect.plan.n_tiles,
        "repeats_best_of": repeat,
        "symmetric_s": t_sym,
        "rectangular_s": t_rect,
        "speedup": t_rect / t_sym,
        "ideal_speedup": rect.plan.n_tiles / sym.plan.n_tiles,
        "max_abs_difference": diff,
    }


def bench_memory(tmp: str, quick: bool) -> list[dict[str, float]]:
    """Peak RSS per worker against the plan, for trace at several N."""
    f, p = make_mlp(d=16, width=64, out=4)
    rows = []
    for n in (2000, 8000) if quick else (2000, 8000, 32000):
        x = np.random.default_rng(2).normal(size=(n, 16))
        store = os.path.join(tmp, f"mem{n}.zarr")
        cluster, client = _cluster(2)
        try:
            t0 = time.perf_counter()
            s = ntkdist.compute(
                f,
                p,
                x,
                store=store,
                output="trace",
                strategy="structured",
                client=client,
                progress=False,
            )
            dt = time.perf_counter() - t0
            peaks = client.run(peak_rss)
        finally:
            client.close()
            cluster.close()
        predicted = s.plan.peak_bytes_per_worker
        rows.append(
            {
                "n": n,
                "tile": s.plan.tile_rows,
                "tiles": s.plan.n_tiles,
                "seconds": dt,
                "predicted": predicted,
                "peak_max": max(peaks.values()),
                "peak_min": min(peaks.values()),
                "error": max(peaks.values()) / predicted - 1,
            }
        )
        shutil.rmtree(store, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the selected sections and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m ntkdist._engine_bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--sections", default="overhead,symmetric,memory")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats")
    parser.add_argument(
        "--outputs", default="trace,full", help="output forms of overhead, symmetric"
    )
    args = parser.parse_args(argv)
    if argv is None:  # the command line: loops and workers allocate alike
        reexec_with_huge_pages()
    jax.config.update("jax_enable_x64", True)
    # The loops run at the precision compute uses (TF32 would differ on GPUs).
    jax.config.update("jax_default_matmul_precision", "highest")
    tmp = args.dir or tempfile.mkdtemp(prefix="ntkdist-bench-")
    sections = args.sections.split(",")
    print(
        f"ntkdist engine benchmark, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}, scratch {tmp}"
    )
    for output in args.outputs.split(","):
        if "overhead" in sections:
            r = bench_overhead(tmp, args.quick, output, args.repeat)
            print(f"\n== engine overhead (1 worker, tiles of about 1 s, {output}) ==")
            for k, v in r.items():
                print(
                    f"  {k:<26} {v:.3f}" if isinstance(v, float) else f"  {k:<26} {v}"
                )
        if "symmetric" in sections:
            r = bench_symmetric(tmp, args.quick, output, args.repeat)
            print(
                f"\n== symmetric savings (2 workers, tiles of about 0.5 s, {output}) =="
            )
            for k, v in r.items():
                print(
                    f"  {k:<26} {v:.4g}" if isinstance(v, float) else f"  {k:<26} {v}"
                )
    if "memory" in sections:
        print("\n== peak RSS per worker vs plan (2 workers, trace, MLP 16-64-64-4) ==")
        print(
            f"  {'N':>6} {'tile':>5} {'tiles':>6} {'time':>8} {'predicted':>11} "
            f"{'peak (max)':>11} {'peak (min)':>11} {'error':>7}"
        )
        for r in bench_memory(tmp, args.quick):
            print(
                f"  {r['n']:>6} {r['tile']:>5} {r['tiles']:>6} {r['seconds']:>7.1f}s "
                f"{format_bytes(r['predicted']):>11} {format_bytes(r['peak_max']):>11} "
                f"{format_bytes(r['peak_min']):>11} {100 * r['error']:>6.1f}%"
            )
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
