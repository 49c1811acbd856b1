"""Benchmark sections ``auto`` and ``contraction`` (see :mod:`ntkdist.bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._job import NOMINAL_TILE
from .._model import Model
from ..kernels import STRATEGIES, choose, get
from . import _tiles as bench

# auto's goal: within this factor of the best measured strategy.
AUTO_GOAL = 1.2
# contraction's goal: at least this fraction of the GEMM rate.
CONTRACTION_GOAL = 0.7


def run_auto(
    rate: float,
    tile_rows: Sequence[dict[str, Any]] | None = None,
    *,
    quick: bool = False,
    tiles: Sequence[int] = (64, 256),
    outputs: Sequence[str] = ("full", "trace"),
    names: Sequence[str] | None = None,
    repeats: int = 3,
    max_seconds: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """For each case, tile and output: auto's pick and its time against the best.

    ``tile_rows`` are the ``tiles`` section's rows of this run; strategies they
    lack for a case are measured here.
    """
    rows = []
    for name, (fn, params, shape) in bench.cases(quick).items():
        if names and name not in names:
            continue
        model = Model(fn)
        for tile in tiles:
            x1 = jax.random.normal(jax.random.PRNGKey(2), (tile, *shape), jnp.float32)
            x2 = jax.random.normal(jax.random.PRNGKey(3), (tile, *shape), jnp.float32)
            for output in outputs:
                measured = {
                    r["strategy"]: r
                    for r in tile_rows or ()
                    if (r["case"], r["tile"], r["output"]) == (name, tile, output)
                }
                for sname in STRATEGIES:
                    if sname not in measured:
                        measured[sname] = bench._one(
                            model,
                            params,
                            x1,
                            x2,
                            output,
                            sname,
                            rate,
                            repeats,
                            8 * 2**30,
                            max_seconds,
                        )
                row = _auto_row(model, params, x1, tile, output, measured)
                row |= {"case": name}
                rows.append(row)
                log(_auto_line(row))
    return rows


def _auto_row(
    model: Model,
    params: Any,
    x: jax.Array,
    tile: int,
    output: str,
    measured: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    pick, costs = choose(model, params, x[:4], tile, tile, output, None)
    nominal, _ = choose(model, params, x[:4], NOMINAL_TILE, NOMINAL_TILE, output, None)
    seconds = {k: r["seconds"] for k, r in measured.items() if "seconds" in r}
    row: dict[str, Any] = {
        "tile": tile,
        "output": output,
        "auto": pick.name,
        "compute_auto": nominal.name,
        "predicted_flops": {k: c.flops for k, c in costs.items()},
        "seconds": seconds,
        "fraction_of_gemm": {
            k: r["fraction_of_gemm"] for k, r in measured.items() if "seconds" in r
        },
        "skipped": {k: r["skipped"] for k, r in measured.items() if "skipped" in r},
    }
    if not seconds:
        return row | {"best": None, "ratio": None, "goal_met": None}
    best = min(seconds, key=seconds.__getitem__)
    ratio = seconds[pick.name] / seconds[best] if pick.name in seconds else None
    nominal_ratio = (
        seconds[nominal.name] / seconds[best] if nominal.name in seconds else None
    )
    return row | {
        "best": best,
        "ratio": ratio,
        "compute_auto_ratio": nominal_ratio,
        "goal": AUTO_GOAL,
        "goal_met": None if ratio is None else ratio <= AUTO_GOAL,
    }


def _auto_line(row: dict[str, Any]) -> str:
    ratio = "not measured" if row["ratio"] is None else f"{row['ratio']:.2f}x best"
    return (
        f"{row['case']:<20} tile {row['tile']:>4} {row['output']:<6} auto "
        f"{row['auto']:<10} best {row['best']}: {ratio}"
    )


def auto_table(rows: Sequence[dict[str, Any]]) -> str:
    """auto's pick, the best measured strategy, the ratio and the 20 % goal."""
    lines = [
        f"{'case':<20} {'tile':>4} {'output':<6} {'auto picks':<11} "
        f"{'auto time':>15} {'best':<11} {'best time':>15} {'ratio':>6} "
        f"{'<=1.2':>5}  compute's pick (tile {NOMINAL_TILE})"
    ]

    def cell(row: dict[str, Any], s: str | None) -> str:
        if s is None or s not in row["seconds"]:
            return f"{'-':>15}"
        return f"{row['seconds'][s]:>8.4f} s {100 * row['fraction_of_gemm'][s]:>3.0f}%"

    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        met = "-" if r["goal_met"] is None else ("yes" if r["goal_met"] else "NO")
        nominal = r["compute_auto"]
        if r.get("compute_auto_ratio") is not None:
            nominal += f" ({r['compute_auto_ratio']:.2f}x best)"
        lines.append(
            f"{r['case']:<20} {r['tile']:>4} {r['output']:<6} {r['auto']:<11} "
            f"{cell(r, r['auto'])} {r['best'] or '-':<11} {cell(r, r['best'])} "
            f"{ratio:>6} {met:>5}  {nominal}"
        )
    measured = [r for r in rows if r["goal_met"] is not None]
    met = sum(r["goal_met"] for r in measured)
    lines.append(
        f"auto within {100 * (AUTO_GOAL - 1):.0f} % of the best: {met} of "
        f"{len(measured)} measured cases (time % = fraction of the GEMM rate)"
    )
    return "\n".join(lines)


def _flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def run_contraction(
    rate: float,
    *,
    tiles: Sequence[int] = (256, 512, 1024),
    outputs: Sequence[str] = ("full", "trace"),
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """``structured``'s contraction of two precomputed factor sets, timed alone.

    For the MLP 3×512, O=10: the factors of two tiles are computed once (and
    timed), then the jitted ``contract`` is timed (median of ``repeats``), with
    XLA's executed FLOPs of the compiled contraction. The fused tile function
    (factors and contraction in one program) is timed too, for comparison.
    """
    fn, params, shape = bench.reference_mlp()
    model = Model(fn)
    strategy = get("structured")
    rows = []
    for tile in tiles:
        x1 = jax.random.normal(jax.random.PRNGKey(2), (tile, *shape), jnp.float32)
        x2 = jax.random.normal(jax.random.PRNGKey(3), (tile, *shape), jnp.float32)
        for output in outputs:
            row = _contraction_row(
                rate, strategy, model, params, x1, x2, output, repeats
            )
            rows.append(row)
            log(
                f"mlp-w512 tile {tile:>5} {output:<6} contraction "
                f"{row['seconds']:.4f} s {row['xla_flops'] / 1e9:.1f} GFLOP "
                f"{100 * row['fraction_of_gemm']:.0f}% of GEMM"
            )
    return rows


def _contraction_row(
    rate: float,
    strategy: Any,
    model: Model,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    output: str,
    repeats: int,
) -> dict[str, Any]:
    factors = jax.jit(lambda p, x: strategy.factors(model, p, x, output))
    contract = jax.jit(lambda p, a, b: strategy.contract(model, p, a, b, output))
    t0 = time.perf_counter()
    f1 = jax.block_until_ready(factors(params, x1))
    f2 = jax.block_until_ready(factors(params, x2))
    factor_compile = time.perf_counter() - t0
    factor_s, _ = bench._median_time(lambda: factors(params, x1), repeats)
    factor_flops = _flops(factors.lower(params, x1).compile())
    compiled = contract.lower(params, f1, f2).compile()
    flops = _flops(compiled)
    jax.block_until_ready(compiled(params, f1, f2))
    median, times = bench._median_time(lambda: compiled(params, f1, f2), repeats)
    jax.block_until_ready(strategy.tile(model, params, x1, x2, output))
    fused_s, _ = bench._median_time(
        lambda: strategy.tile(model, params, x1, x2, output), repeats
    )
    fraction = flops / median / rate
    return {
        "case": "mlp-w512",
        "tile": int(x1.shape[0]),
        "output": output,
        "seconds": median,
        "times": times,
        "xla_flops": flops,
        "fraction_of_gemm": fraction,
        "goal": CONTRACTION_GOAL,
        "goal_met": fraction >= CONTRACTION_GOAL,
        "factors_seconds": factor_s,
        "factors_xla_flops": factor_flops,
        "factors_fraction_of_gemm": factor_flops / factor_s / rate,
        "factors_compile_seconds": factor_compile,
        "fused_tile_seconds": fused_s,
    }


def contraction_table(rows: Sequence[dict[str, Any]]) -> str:
    """Contraction time, FLOPs, % of the GEMM rate, against factors and fused."""
    lines = [
        "MLP 256→3×512→10, structured; contraction of precomputed factors "
        f"(goal >= {100 * CONTRACTION_GOAL:.0f} % of GEMM)",
        f"{'tile':>5} {'output':<6} {'contract':>10} {'GFLOP':>8} {'% GEMM':>7} "
        f"{'goal':>4} {'factors x1':>11} {'% GEMM':>7} {'fused tile':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r['tile']:>5} {r['output']:<6} {r['seconds']:>8.4f} s "
            f"{r['xla_flops'] / 1e9:>8.2f} {100 * r['fraction_of_gemm']:>6.1f}% "
            f"{'met' if r['goal_met'] else 'NO':>4} {r['factors_seconds']:>9.4f} s "
            f"{100 * r['factors_fraction_of_gemm']:>6.1f}% "
            f"{r['fused_tile_seconds']:>9.4f} s"
        )
    return "\n".join(lines)
