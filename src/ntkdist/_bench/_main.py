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
- ``real``: real networks (``--real-cases``, default the CIFAR ResNet-18 and
  the ViT-tiny of ``ntkdist._bench._models``): one ``ntkdist.ntk`` tile per
  tile size and output, each in a process of its own (first call, median,
  the strategy ``auto`` ran, fraction of the GEMM rate, peak memory against
  the strategy's predicted bytes), then the whole ``trace`` kernel of
  ``--real-engine CASE:N`` through ``ntkdist.compute``, start-up included.

Strategies whose predicted memory exceeds ``--memory-budget`` or whose
predicted time exceeds ``--max-seconds`` are reported as skipped, with the
prediction, rather than run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..kernels import STRATEGIES
from . import _kernel, _ooc, _real, _sections
from ._tiles import gemm_rate, machine, run_tiles, table

SECTIONS = ("tiles", "auto", "contraction", "kernel", "ooc", "real")
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
    parser.add_argument(
        "--outputs",
        default="full,trace",
        help="comma-separated output forms the tiles section times "
        "(default full,trace)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated strategies to time (default {','.join(STRATEGIES)})",
    )
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
    g = parser.add_argument_group("real")
    g.add_argument(
        "--real-cases",
        default=",".join(_real.DEFAULT_CASES),
        help="real networks, from resnet18-cifar, resnet18-cifar-w16 (channels "
        "16/32/64/128), vit-tiny",
    )
    g.add_argument("--real-tiles", default="16,64", help="tile sizes (16,64)")
    g.add_argument(
        "--real-strategy", default="auto", help="strategy of the tiles (auto)"
    )
    g.add_argument(
        "--real-engine",
        default="resnet18-cifar-w16:2048",
        help="CASE:N of the whole trace kernel through compute; 'none' skips it "
        "(default resnet18-cifar-w16:2048)",
    )
    g.add_argument(
        "--real-plan",
        default="none",
        help="CASE:N1xN2 to plan (probe included) and print, e.g. "
        "resnet18-cifar:60000x50000 for CIFAR-10 train+test × train; 'none' "
        "(the default) skips it",
    )


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
    from .._precision import DEFAULT, matmul_precision

    with matmul_precision(DEFAULT):
        return _main_from_args(args)


def _main_from_args(args: argparse.Namespace) -> int:
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
        result["auto"] = _sections.run_auto(rate, result.get("results"), **tile_args)
        print()
        print(_sections.auto_table(result["auto"]))
        _write(result, args.json)
    if "contraction" in sections:
        print("\n== contraction: structured's contraction stage alone ==")
        result["contraction"] = _sections.run_contraction(
            rate,
            tiles=_ints(
                args.contraction_tiles or ("128,256" if args.quick else "256,512,1024")
            ),
            outputs=args.outputs.split(","),
            repeats=args.repeats,
        )
        print()
        print(_sections.contraction_table(result["contraction"]))
        _write(result, args.json)
    if "kernel" in sections:
        n = args.n or (1024 if args.quick else 8192)
        print(f"\n== kernel: the whole symmetric kernel, N={n} ==")
        result["kernel"] = _kernel.run_kernel(
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
        print(_kernel.kernel_table(result["kernel"]))
        _write(result, args.json)
    if "ooc" in sections:
        n = args.ooc_n or (4096 if args.quick else 100_000)
        print(f"\n== ooc: trace kernel out of core, N={n}, killed and resumed ==")
        result["ooc"] = _ooc.run_ooc(
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
        print(_ooc.ooc_table(result["ooc"]))
        _write(result, args.json)
    if "real" in sections:
        print("\n== real: tiles of real networks, each in a process of its own ==")
        result["real"] = _real.run_real(
            rate,
            cases=[c for c in args.real_cases.split(",") if c],
            tiles=_ints(args.real_tiles),
            outputs=args.outputs.split(","),
            repeats=args.repeats,
            strategy=args.real_strategy,
        )
        _write(result, args.json)
        if args.real_engine != "none":
            case, _, n = args.real_engine.partition(":")
            result["real_engine"] = _real.run_engine(
                rate,
                case=case,
                n=int(n or 2048),
                workers=args.workers,
                executor=args.executor,
                scratch=args.dir,
            )
            print(_real.engine_line(result["real_engine"]))
        _write(result, args.json)
        if args.real_plan != "none":
            case, _, sizes = args.real_plan.partition(":")
            n1, _, n2 = sizes.partition("x")
            result["real_plan"] = _real.run_plan(
                case, int(n1), int(n2 or n1), output=args.outputs.split(",")[0]
            )
            print(result["real_plan"]["text"])
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
        from .._hugepages import reexec_with_huge_pages

        reexec_with_huge_pages()
    return main_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
