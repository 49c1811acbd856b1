"""Benchmark section ``kernel``: a whole kernel, ntkdist against naive tiling.

The naive tiling is what neural-tangents' ``batch`` does: every tile pair
``(i, j)`` of the whole ``N × N`` grid (both triangles), each computed from
scratch by the fused per-tile function (both blocks' factors recomputed every
time), each result copied to numpy and dropped.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

import ntkdist

from .._model import Model
from .._planner import format_bytes
from ..executors._devices import default_workers
from ..kernels import get
from . import _tiles as bench

# The goal: ntkdist at least this many times faster than the naive tiling.
SPEEDUP_GOAL = 5.0


def store_bytes(path: str) -> int:
    """Bytes on disk under ``path``: the sum of its files' sizes."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += os.path.getsize(os.path.join(root, f))
    return total


def supports_cache() -> bool:
    """Whether this ``ntkdist.compute`` takes a ``cache`` argument."""
    return "cache" in inspect.signature(ntkdist.compute).parameters


class TileFlops:
    """XLA's executed FLOPs of a strategy's tile function, by tile shape."""

    def __init__(self, strategy: Any, model: Model, params: Any, x: np.ndarray):
        """For tiles of samples shaped like ``x``'s rows."""
        self.strategy, self.model, self.params, self.x = strategy, model, params, x
        self._by: dict[tuple[int, int, str], float] = {}

    def __call__(self, rows: int, cols: int, output: str) -> float:
        """FLOPs of one ``rows × cols`` tile."""
        key = (rows, cols, output)
        if key not in self._by:
            self._by[key] = bench.executed_flops(
                self.strategy,
                self.model,
                self.params,
                jnp.asarray(self.x[:rows]),
                jnp.asarray(self.x[:cols]),
                output,
            )
        return self._by[key]


def run_kernel(
    rate: float,
    *,
    n: int = 8192,
    outputs: Sequence[str] = ("full", "trace"),
    workers: int | None = None,
    executor: str = "dask",
    naive_tile: int | None = None,
    cache: str | None = None,
    check_tiles: int = 3,
    scratch: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per output: ntkdist end to end, the naive tiling, the plan."""
    if cache is not None and not supports_cache():
        raise SystemExit(
            f"--cache {cache}: this ntkdist.compute takes no cache argument"
        )
    fn, params, shape = bench.reference_mlp()
    model = Model(fn)
    x = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    n_workers = 1 if executor == "serial" else workers or default_workers()
    rows = []
    for output in outputs:
        tmp = tempfile.mkdtemp(prefix=f"ntkdist-bench-kernel-{output}-", dir=scratch)
        try:
            rows.append(
                _one_output(
                    rate,
                    model,
                    params,
                    x,
                    output,
                    workers,
                    n_workers,
                    executor,
                    naive_tile,
                    cache,
                    check_tiles,
                    tmp,
                    log,
                )
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}")
    return rows


def _one_output(
    rate: float,
    model: Model,
    params: Any,
    x: np.ndarray,
    output: str,
    workers: int | None,
    n_workers: int,
    executor: str,
    naive_tile: int | None,
    cache: str | None,
    check_tiles: int,
    tmp: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    n = len(x)
    extra = {} if cache is None else {"cache": cache}
    plan = ntkdist.plan(model, params, x, output=output, workers=n_workers, **extra)
    log(str(plan))
    path = os.path.join(tmp, "kernel.zarr")
    t0 = time.perf_counter()
    store = ntkdist.compute(
        model,
        params,
        x,
        store=path,
        output=output,
        strategy="auto",
        workers=workers,
        executor=executor,
        progress=False,
        **extra,
    )
    engine_s = time.perf_counter() - t0
    written = store_bytes(path)
    done, total = store.progress()
    tile = store.plan.tile_rows
    chosen = store.spec.strategy
    log(
        f"ntkdist {output}: {engine_s:.1f} s, {total} tiles of {tile}, "
        f"{chosen}, factor cache {getattr(store.plan, 'cache', '-')}, "
        f"{format_bytes(written)} written"
    )
    flops_of = TileFlops(get(chosen), model, params, x)
    engine_flops = sum(flops_of(*t.shape, output) for t in store.plan.tiles())

    # The naive tiling: both triangles, factors recomputed for every tile.
    nt = naive_tile or tile
    structured = get("structured")
    starts = list(range(0, n, nt))
    rng = np.random.default_rng(1)
    pairs = [(i, j) for i in starts for j in starts]
    checked = {
        pairs[k] for k in rng.choice(len(pairs), min(check_tiles, len(pairs)), False)
    }
    xs = {i: jnp.asarray(x[i : i + nt]) for i in starts}
    t0 = time.perf_counter()
    for shape in {(len(xs[i]), len(xs[j])) for i, j in pairs}:
        np.asarray(
            structured.tile(model, params, xs[0][: shape[0]], xs[0][: shape[1]], output)
        )
    naive_compile_s = time.perf_counter() - t0
    naive_flops_of = TileFlops(structured, model, params, x)
    naive_flops = sum(naive_flops_of(len(xs[i]), len(xs[j]), output) for i, j in pairs)
    errors = []
    t0 = time.perf_counter()
    for i, j in pairs:
        k = np.asarray(structured.tile(model, params, xs[i], xs[j], output))
        if (i, j) in checked:
            t_check = time.perf_counter()
            ref = np.asarray(store.kernel[i : i + nt, j : j + nt])
            errors.append(_error(k, ref))
            t0 += time.perf_counter() - t_check  # reading the store is not naive work
        del k
    naive_s = time.perf_counter() - t0
    speedup = naive_s / engine_s
    log(
        f"naive {output}: {naive_s:.1f} s, {len(pairs)} tiles of {nt} "
        f"({naive_compile_s:.1f} s compiling, not counted); speed-up {speedup:.2f}x"
    )
    return {
        "output": output,
        "n": n,
        "dtype": "float32",
        "workers": n_workers,
        "executor": executor,
        "cache": cache,
        "strategy": chosen,
        "tile": tile,
        "tiles": total,
        "tiles_done": done,
        "seconds": engine_s,
        "bytes_written": written,
        "plan_bytes_on_disk": plan.bytes_on_disk,
        "plan_tile": plan.tile_rows,
        "plan_strategy": plan.strategy,
        "plan_predicted_seconds": plan.est_seconds,
        "plan_probe_flop_rate": plan.flop_rate,
        "plan_text": str(plan),
        "plan_cache": getattr(plan, "cache", None),
        "cache_used": getattr(store.plan, "cache", None),
        "tile_fn_flops": engine_flops,
        "fraction_of_gemm": engine_flops / engine_s / rate,
        "naive_tile": nt,
        "naive_tiles": len(pairs),
        "naive_seconds": naive_s,
        "naive_compile_seconds": naive_compile_s,
        "naive_flops": naive_flops,
        "naive_fraction_of_gemm": naive_flops / naive_s / rate,
        "speedup": speedup,
        "goal": SPEEDUP_GOAL,
        "goal_met": speedup >= SPEEDUP_GOAL,
        "checked_tiles": sorted([int(i), int(j)] for i, j in checked),
        "max_relative_error": max(errors, default=None),
    }


def _error(k: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(np.max(np.abs(k - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """ntkdist against naive tiling, with the plan's prediction."""
    lines = [
        f"{'output':<6} {'N':>6} {'strategy':<10} {'tile':>5} {'tiles':>6} "
        f"{'ntkdist':>9} {'% GEMM':>6} {'predicted':>9} {'written':>10} "
        f"{'naive':>9} {'% GEMM':>6} {'tiles':>6} {'speed-up':>8} {'>=5x':>4} "
        f"{'max err':>8}"
    ]
    for r in rows:
        pred = r["plan_predicted_seconds"]
        err = r["max_relative_error"]
        lines.append(
            f"{r['output']:<6} {r['n']:>6} {r['strategy']:<10} {r['tile']:>5} "
            f"{r['tiles']:>6} {r['seconds']:>7.1f} s "
            f"{100 * r['fraction_of_gemm']:>5.0f}% "
            + (f"{'-':>9}" if pred is None else f"{pred:>7.1f} s")
            + f" {format_bytes(r['bytes_written']):>10} {r['naive_seconds']:>7.1f} s "
            f"{100 * r['naive_fraction_of_gemm']:>5.0f}% {r['naive_tiles']:>6} "
            f"{r['speedup']:>7.2f}x {'met' if r['goal_met'] else 'NO':>4} "
            + (f"{'-':>8}" if err is None else f"{err:>8.1e}")
        )
    first = rows[0] if rows else {"workers": "?", "executor": "?"}
    lines.append(
        "ntkdist: compute(strategy='auto') end to end on "
        f"{first['workers']} worker(s) ({first['executor']}), "
        "cluster start and compilation included; naive: every tile pair of the "
        "N×N grid with the fused structured tile function, compiled beforehand; "
        "% GEMM: XLA's FLOPs of the plain tile function for every tile computed "
        "/ wall time / GEMM rate (with a factor cache ntkdist does less work "
        "than that: its figure is an equivalent rate)"
    )
    return "\n".join(lines)
