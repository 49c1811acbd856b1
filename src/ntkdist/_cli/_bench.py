"""CLI subcommand ``bench``."""

from __future__ import annotations

import argparse

from .._bench import _main as bench
from ._messages import in_cli_words


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``bench`` subcommand to the ``ntkdist`` parser."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark suite: tiles, auto, contraction, kernel, ooc (see --sections)",
        description=(bench.__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=in_cli_words(bench.main_from_args))
