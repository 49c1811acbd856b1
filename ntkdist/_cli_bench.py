"""CLI subcommand ``bench``."""

from __future__ import annotations

import argparse

from . import bench


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``bench`` subcommand to the ``ntkdist`` parser."""
    parser = subparsers.add_parser(
        "bench",
        help="time each strategy on one tile against this machine's GEMM rate",
        description=bench.__doc__,
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.main_from_args)
