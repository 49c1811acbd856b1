"""CLI subcommands of the consumers (``regress``, ``spectrum``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the consumer subcommands to the ``ntkdist`` parser."""
