"""CLI subcommand ``bench``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``bench`` subcommand to the ``ntkdist`` parser."""
