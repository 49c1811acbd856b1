"""The shared benchmark cases (models, GEMM rate, machine) and the ``tiles`` section."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._model import Model
from ..kernels import STRATEGIES, get

# -- models -------------------------------------------------------------------


def mlp(params: Any, x: jax.Array) -> jax.Array:
    """ReLU MLP with biases: ``params = [(w, b), ...]``."""
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def cnn(params: Any, x: jax.Array) -> jax.Array:
    """Two 3×3 convolutions (the second strided), global average pool, dense head."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(
        x, params["c1"], (1, 1), "SAME", dimension_numbers=dn
    )
    h = jax.nn.relu(h + params["b1"])
    h = jax.lax.conv_general_dilated(
        h, params["c2"], (2, 2), "SAME", dimension_numbers=dn
    )
    h = jax.nn.relu(h + params["b2"])
    return jnp.mean(h, axis=(1, 2)) @ params["head"]


def attention(params: Any, x: jax.Array) -> jax.Array:
    """One self-attention block with an MLP and a linear readout, ``x: [n, T, D]``."""
    q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
    a = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / jnp.sqrt(q.shape[-1]), axis=-1)
    h = x + (a @ v) @ params["wo"]
    h = h + jax.nn.gelu(h @ params["w1"]) @ params["w2"]
    return jnp.mean(h, axis=1) @ params["head"]


def _init_mlp(d_in: int, width: int, depth: int, out: int) -> Any:
    dims = [d_in] + [width] * depth + [out]
    keys = jax.random.split(jax.random.PRNGKey(0), len(dims))
    return [
        (
            jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
            jnp.zeros(b, jnp.float32),
        )
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=False)
    ]


def _init_cnn(channels: int, out: int) -> Any:
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "c1": jax.random.normal(k[0], (3, 3, 3, channels), jnp.float32) / np.sqrt(27),
        "b1": jnp.zeros(channels, jnp.float32),
        "c2": jax.random.normal(k[1], (3, 3, channels, channels), jnp.float32)
        / np.sqrt(9 * channels),
        "b2": jnp.zeros(channels, jnp.float32),
        "head": jax.random.normal(k[2], (channels, out), jnp.float32)
        / np.sqrt(channels),
    }


def _init_attention(d: int, out: int) -> Any:
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "head")
    shapes = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d), (d, out)]
    keys = jax.random.split(jax.random.PRNGKey(0), len(names))
    return {
        n: jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0])
        for n, k, s in zip(names, keys, shapes, strict=True)
    }


def cases(quick: bool) -> dict[str, tuple[Callable[..., Any], Any, tuple[int, ...]]]:
    """Benchmark cases: name -> (apply_fn, params, per-sample input shape)."""
    if quick:
        return {
            "mlp-w256": (mlp, _init_mlp(64, 256, 3, 10), (64,)),
            "cnn-16x16-c16": (cnn, _init_cnn(16, 10), (16, 16, 3)),
        }
    return {
        "mlp-w512": (mlp, _init_mlp(256, 512, 3, 10), (256,)),
        "mlp-w2048": (mlp, _init_mlp(256, 2048, 3, 10), (256,)),
        "mlp-nt-reference": (mlp, _init_mlp(256, 512, 2, 10), (256,)),
        "cnn-32x32-c64": (cnn, _init_cnn(64, 10), (32, 32, 3)),
        "attention-t16-d128": (attention, _init_attention(128, 10), (16, 128)),
    }


# -- measurement --------------------------------------------------------------


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def gemm_rate(size: int | None = None, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (median of runs).

    ``size`` defaults to 2048 on CPUs and 8192 on accelerators, where a
    smaller product is too short to reach the rate.
    """
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    t, _ = _median_time(lambda: mm(a, b), repeats)
    return 2.0 * size**3 / t


def reference_mlp() -> tuple[Callable[..., Any], Any, tuple[int, ...]]:
    """The MLP of the ``contraction`` and ``kernel`` sections: 256→3×512→10."""
    return mlp, _init_mlp(256, 512, 3, 10), (256,)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        # glibc malloc on transparent huge pages in this process, as in the
        # workers (ntkdist._hugepages); "" where it was not configured.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def run_tiles(
    rate: float,
    *,
    quick: bool = False,
    tiles: Sequence[int] = (64, 256),
    outputs: Sequence[str] = ("full", "trace"),
    strategies: Sequence[str] = tuple(STRATEGIES),
    names: Sequence[str] | None = None,
    repeats: int = 3,
    memory_budget: float = 8 * 2**30,
    max_seconds: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The ``tiles`` section: one row per case, tile, output and strategy."""
    rows = []
    for name, (fn, params, shape) in cases(quick).items():
        if names and name not in names:
            continue
        model = Model(fn)
        for tile in tiles:
            x1 = jax.random.normal(jax.random.PRNGKey(2), (tile, *shape), jnp.float32)
            x2 = jax.random.normal(jax.random.PRNGKey(3), (tile, *shape), jnp.float32)
            for output in outputs:
                for sname in strategies:
                    row = _one(
                        model,
                        params,
                        x1,
                        x2,
                        output,
                        sname,
                        rate,
                        repeats,
                        memory_budget,
                        max_seconds,
                    )
                    row |= {"case": name, "tile": tile, "output": output}
                    rows.append(row)
                    log(_format_row(row))
    return rows


def run(
    *,
    quick: bool = False,
    tiles: Sequence[int] = (64, 256),
    outputs: Sequence[str] = ("full", "trace"),
    strategies: Sequence[str] = tuple(STRATEGIES),
    names: Sequence[str] | None = None,
    repeats: int = 3,
    memory_budget: float = 8 * 2**30,
    max_seconds: float = 60.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``tiles`` section alone, with the GEMM rate, as a JSON-able dict."""
    rate = gemm_rate()
    log(f"float32 GEMM rate: {rate / 1e9:.1f} GFLOP/s")
    rows = run_tiles(
        rate,
        quick=quick,
        tiles=tiles,
        outputs=outputs,
        strategies=strategies,
        names=names,
        repeats=repeats,
        memory_budget=memory_budget,
        max_seconds=max_seconds,
        log=log,
    )
    return {
        "machine": machine(),
        "gemm_flops_per_s": rate,
        "repeats": repeats,
        "results": rows,
    }


def executed_flops(
    strategy: Any, model: Model, params: Any, x1: jax.Array, x2: jax.Array, output: str
) -> float:
    """FLOPs of the compiled tile function, from XLA's cost analysis, or counted
    from the tile's jaxpr where XLA's misses most of them (on GPUs it counts
    no convolution run by cuDNN)."""
    from ..kernels._base import _tile
    from ..kernels._flops import jaxpr_flops

    compiled = _tile.lower(strategy, model, output, params, x1, x2).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", 0.0))
    if jax.default_backend() == "cpu":
        return flops
    traced = jax.make_jaxpr(_tile, static_argnums=(0, 1, 2))
    counted = jaxpr_flops(traced(strategy, model, output, params, x1, x2))
    return counted if flops < 0.5 * counted else flops


def _one(
    model: Model,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    output: str,
    sname: str,
    rate: float,
    repeats: int,
    memory_budget: float,
    max_seconds: float,
) -> dict[str, Any]:
    strategy = get(sname)
    n1, n2 = x1.shape[0], x2.shape[0]
    cost = strategy.cost(model, params, x1, n1, n2, output)
    row: dict[str, Any] = {
        "strategy": sname,
        "predicted_flops": cost.flops,
        "predicted_bytes": cost.bytes,
    }
    predicted_s = cost.flops / rate
    if cost.bytes > memory_budget:
        return row | {"skipped": f"predicted memory {cost.bytes / 2**30:.1f} GiB"}
    if predicted_s > max_seconds:
        return row | {"skipped": f"predicted {predicted_s:.0f} s at the GEMM rate"}
    t0 = time.perf_counter()
    jax.block_until_ready(strategy.tile(model, params, x1, x2, output))
    compile_s = time.perf_counter() - t0
    flops = executed_flops(strategy, model, params, x1, x2, output)
    median, times = _median_time(
        lambda: strategy.tile(model, params, x1, x2, output), repeats
    )
    return row | {
        "seconds": median,
        "times": times,
        "compile_seconds": compile_s,
        "xla_flops": flops,
        "fraction_of_gemm": flops / median / rate,
    }


def _format_row(row: dict[str, Any]) -> str:
    head = (
        f"{row['case']:<20} tile {row['tile']:>4} {row['output']:<6} "
        f"{row['strategy']:<11}"
    )
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    return (
        f"{head} {row['seconds']:9.4f} s  {row['xla_flops'] / 1e9:9.2f} GFLOP  "
        f"{100 * row['fraction_of_gemm']:5.1f}% of GEMM"
    )


def table(result: dict[str, Any]) -> str:
    """The ``tiles`` table: seconds and % of GEMM, ``structured``'s speed-up."""
    lines = [
        f"float32 GEMM rate: {result['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({result['machine']['cpus']} CPUs, {result['machine']['backend']})",
        f"{'case':<20} {'tile':>4} {'output':<6} "
        + " ".join(f"{s:>17}" for s in STRATEGIES)
        + f" {'speed-up':>9}",
    ]
    groups: dict[tuple[str, int, str], dict[str, Any]] = {}
    for row in result["results"]:
        groups.setdefault((row["case"], row["tile"], row["output"]), {})[
            row["strategy"]
        ] = row
    for (case, tile, output), by in groups.items():
        cells = []
        for s in STRATEGIES:
            r = by.get(s)
            cells.append(
                f"{'-':>17}"
                if r is None or "seconds" not in r
                else f"{r['seconds']:>9.4f} s {100 * r['fraction_of_gemm']:>3.0f}%"
            )
        sj, ss = by.get("jacobian", {}), by.get("structured", {})
        speed = (
            f"{sj['seconds'] / ss['seconds']:>8.1f}x"
            if "seconds" in sj and "seconds" in ss
            else f"{'-':>9}"
        )
        lines.append(
            f"{case:<20} {tile:>4} {output:<6} " + " ".join(cells) + f" {speed}"
        )
    return "\n".join(lines)
