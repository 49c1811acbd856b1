"""Benchmark suite: strategies per tile, ``auto``'s picks, contraction, kernels.

Run ``ntkdist bench`` (or ``python -m ntkdist.bench``). In one run it measures
this machine's float32 matrix-multiply rate (the *GEMM rate*), then the
sections chosen with ``--sections`` (default ``tiles,auto,contraction,kernel``;
``ooc`` runs only when named). Every compute figure is also reported as a
fraction of that GEMM rate; per-tile figures are medians of ``--repeats`` runs
after compilation. Each section prints a table; all go into one JSON file
(``--json``), rewritten after each section.

Sections:

- ``tiles``: each strategy's time for one tile (``--cases``, ``--tiles``,
  ``--outputs``), with XLA's executed FLOPs of the compiled tile function.
- ``auto``: for each case, tile and output of ``tiles``, the strategy ``auto``
  picks (``kernels.choose`` at that tile, and ``compute``'s pick at its
  nominal tile) and its time relative to the best measured strategy (goal:
  within 20 %).
- ``contraction``: the contraction stage of ``structured`` alone (factors
  computed beforehand) for the MLP 3×512, O=10, at ``--contraction-tiles``
  (goal: at least 70 % of the GEMM rate).
- ``kernel``: the whole symmetric kernel of that MLP at ``--n`` samples,
  ``ntkdist.compute`` end to end on an embedded LocalCluster against the naive
  tiling (every tile pair of the N×N grid from scratch with the fused
  ``structured`` tile function), with the plan's predicted time (goal: 5×).
- ``ooc``: an out-of-core ``trace`` kernel (``--ooc-n`` samples, small MLP)
  through the CLI in its own process group, killed with SIGKILL part-way and
  resumed; wall times, tiles recomputed, bytes on disk, peak resident memory
  of the CLI and its workers (goal: under 4 GiB), and tiles checked against
  ``ntkdist.ntk``.

Strategies whose predicted memory exceeds ``--memory-budget`` or whose
predicted time exceeds ``--max-seconds`` are reported as skipped, with the
prediction, rather than run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._model import Model
from .kernels import STRATEGIES, get

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


def gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (median of runs)."""
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
    """FLOPs of the compiled tile function, from XLA's cost analysis."""
    from .kernels._base import _tile

    compiled = _tile.lower(strategy, model, output, params, x1, x2).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


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


SECTIONS = ("tiles", "auto", "contraction", "kernel", "ooc")
DEFAULT_SECTIONS = "tiles,auto,contraction,kernel"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's command-line options."""
    parser.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"comma-separated, from {','.join(SECTIONS)} (default "
        f"{DEFAULT_SECTIONS}; ooc writes about 40 GB at its default size)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small cases and sizes (kernel N=1024, ooc N=4096)",
    )
    parser.add_argument("--tiles", default="64,256", help="tile sizes, comma-separated")
    parser.add_argument("--outputs", default="full,trace")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--cases", default="", help="case names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="skip runs predicted to take longer",
    )
    parser.add_argument(
        "--json",
        default="bench-results/kernels.json",
        help="where to write the JSON results",
    )
    parser.add_argument(
        "--dir", help="scratch directory for stores (default: the system temp dir)"
    )
    g = parser.add_argument_group("contraction")
    g.add_argument(
        "--contraction-tiles",
        help="tile sizes of the contraction section (default 256,512,1024; "
        "--quick: 128,256)",
    )
    g = parser.add_argument_group("kernel")
    g.add_argument("--n", type=int, help="samples of the kernel section (default 8192)")
    g.add_argument(
        "--kernel-outputs", default="full,trace", help="output forms of kernel"
    )
    g.add_argument(
        "--naive-tile",
        type=int,
        help="tile of the naive loop (default: the tile ntkdist's plan chose)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="workers of the embedded cluster (kernel, ooc; default: one per GPU, "
        "else one per core)",
    )
    g.add_argument(
        "--executor",
        choices=["dask", "serial"],
        default="dask",
        help="how ntkdist runs tiles in kernel and ooc (default dask)",
    )
    g.add_argument(
        "--cache",
        help="passed to ntkdist.compute(cache=...) in kernel, where supported",
    )
    g = parser.add_argument_group("ooc")
    g.add_argument(
        "--ooc-n", type=int, help="samples of the ooc section (default 100000)"
    )
    g.add_argument(
        "--ooc-tile", type=int, default=2048, help="tile of the ooc job (2048)"
    )
    g.add_argument(
        "--ooc-memory-budget", default="1GiB", help="memory budget per worker"
    )
    g.add_argument(
        "--kill-at",
        type=float,
        default=0.3,
        help="fraction of the tiles done when the first run is killed (0.3)",
    )
    g.add_argument(
        "--check-tiles",
        type=int,
        default=3,
        help="random tiles compared with ntkdist.ntk (ooc, kernel)",
    )
    g.add_argument(
        "--verify-checksums",
        action="store_true",
        help="re-read every tile of the ooc store and check its checksum",
    )
    g.add_argument("--keep", action="store_true", help="keep the ooc store")


def _write(result: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def main_from_args(args: argparse.Namespace) -> int:
    """Run the chosen sections; print a table per section and write the JSON.

    Everything runs at ntkdist's default matmul precision (``"highest"``), the
    precision ``compute`` uses, so that reference loops and tiles are timed
    at the accuracy users get (on GPUs, JAX's own default would be TF32).
    """
    from ._precision import DEFAULT, matmul_precision

    with matmul_precision(DEFAULT):
        return _main_from_args(args)


def _main_from_args(args: argparse.Namespace) -> int:
    from . import _bench_kernel, _bench_ooc, _bench_sections

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; expected some of {SECTIONS}")
    rate = gemm_rate()
    result: dict[str, Any] = {
        "machine": machine(),
        "gemm_flops_per_s": rate,
        "repeats": args.repeats,
        "sections": sections,
    }
    print(f"float32 GEMM rate: {rate / 1e9:.1f} GFLOP/s (median of 5)")
    tile_args = {
        "quick": args.quick,
        "tiles": _ints(args.tiles),
        "outputs": args.outputs.split(","),
        "names": [c for c in args.cases.split(",") if c] or None,
        "repeats": args.repeats,
        "max_seconds": args.max_seconds,
    }
    if "tiles" in sections:
        print("\n== tiles: one tile per strategy ==")
        result["results"] = run_tiles(
            rate, strategies=args.strategies.split(","), **tile_args
        )
        print()
        print(table(result))
        _write(result, args.json)
    if "auto" in sections:
        print("\n== auto: the strategy auto picks against the best measured ==")
        result["auto"] = _bench_sections.run_auto(
            rate, result.get("results"), **tile_args
        )
        print()
        print(_bench_sections.auto_table(result["auto"]))
        _write(result, args.json)
    if "contraction" in sections:
        print("\n== contraction: structured's contraction stage alone ==")
        result["contraction"] = _bench_sections.run_contraction(
            rate,
            tiles=_ints(
                args.contraction_tiles or ("128,256" if args.quick else "256,512,1024")
            ),
            outputs=args.outputs.split(","),
            repeats=args.repeats,
        )
        print()
        print(_bench_sections.contraction_table(result["contraction"]))
        _write(result, args.json)
    if "kernel" in sections:
        n = args.n or (1024 if args.quick else 8192)
        print(f"\n== kernel: the whole symmetric kernel, N={n} ==")
        result["kernel"] = _bench_kernel.run_kernel(
            rate,
            n=n,
            outputs=args.kernel_outputs.split(","),
            workers=args.workers,
            executor=args.executor,
            naive_tile=args.naive_tile,
            cache=args.cache,
            check_tiles=args.check_tiles,
            scratch=args.dir,
        )
        print()
        print(_bench_kernel.kernel_table(result["kernel"]))
        _write(result, args.json)
    if "ooc" in sections:
        n = args.ooc_n or (4096 if args.quick else 100_000)
        print(f"\n== ooc: trace kernel out of core, N={n}, killed and resumed ==")
        result["ooc"] = _bench_ooc.run_ooc(
            rate,
            n=n,
            tile=args.ooc_tile,
            memory_budget=args.ooc_memory_budget,
            workers=args.workers,
            executor=args.executor,
            kill_at=args.kill_at,
            check_tiles=args.check_tiles,
            verify_checksums=args.verify_checksums,
            keep=args.keep,
            scratch=args.dir,
        )
        print()
        print(_bench_ooc.ooc_table(result["ooc"]))
        _write(result, args.json)
    # Load on a shared machine changes the rate: measured again at the end.
    result["gemm_flops_per_s_end"] = gemm_rate()
    _write(result, args.json)
    print(
        f"\nfloat32 GEMM rate at the end: {result['gemm_flops_per_s_end'] / 1e9:.1f}"
        f" GFLOP/s (fractions use the first, {rate / 1e9:.1f})"
    )
    print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ntkdist.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m ntkdist.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is None:  # the command line: loops and workers allocate alike
        from ._hugepages import reexec_with_huge_pages

        reexec_with_huge_pages()
    return main_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
