"""``ntkdist plot``: a heat-map of a stored kernel (parsing and printing only).

The work is in :mod:`ntkdist.plot`.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import NtkdistError
from ._messages import in_cli_words


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``plot`` to the ``ntkdist`` parser."""
    p = subparsers.add_parser(
        "plot",
        help="heat-map of a stored kernel (PNG)",
        description=(
            "Draw a kernel, or a block of it, as a heat-map with a colour bar. "
            "The block is read from the store a strip at a time; a block longer "
            "than --max-size along an axis is subsampled with a stride (the "
            "title says so). Full and diagonal kernels show one output entry "
            "(--out1/--out2) or, by default, the mean over outputs (the trace "
            "kernel). Needs matplotlib: pip install 'ntkdist[plot]'."
        ),
    )
    p.add_argument("store", metavar="STORE", help="ntkdist store, zarr array or .npy")
    p.add_argument("--out", required=True, metavar="OUT.png", help="where to save")
    p.add_argument("--rows", type=_span, metavar="A:B", help="x1 samples A..B-1")
    p.add_argument("--cols", type=_span, metavar="C:D", help="x2 samples C..D-1")
    p.add_argument(
        "--out1",
        type=int,
        help="output index (full: the first; diagonal: the output shown)",
    )
    p.add_argument("--out2", type=int, help="full kernels: the second output index")
    p.add_argument(
        "--labels",
        metavar="Y",
        help="labels of the x1 samples (y.npy, data.npz:key or a zarr array): "
        "sort rows (and a square kernel's columns) by label",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=2048,
        help="most samples drawn per axis; longer blocks are strided (default 2048)",
    )
    p.add_argument("--title", help="replace the title")
    p.set_defaults(func=in_cli_words(run_plot))


def _span(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = int(start), int(stop)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a block START:STOP of sample indices (e.g. 0:512)"
        ) from err
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a block START:STOP needs 0 <= START < STOP"
        )
    return a, b


def run_plot(args: argparse.Namespace) -> int:
    """``ntkdist plot``: read the block, save the PNG, say where."""
    from ..plot import plot_kernel
    from ._consume import load_kernel
    from ._load import load_input

    try:
        kernel = load_kernel(args.store)
        labels = None if args.labels is None else load_input(args.labels, "--labels")
        path = plot_kernel(
            kernel,
            args.out,
            rows=args.rows,
            cols=args.cols,
            out1=args.out1,
            out2=args.out2,
            labels=labels,
            max_size=args.max_size,
            title=args.title,
        )
    except NtkdistError as err:
        print(f"ntkdist plot: error: {err}", file=sys.stderr)
        return 2
    print(f"plot saved to {path}")
    return 0
