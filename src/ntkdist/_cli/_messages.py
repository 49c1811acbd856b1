"""Errors in the command line's words: its flags where the API names keywords.

An :class:`~ntkdist.NtkdistError` is written for Python callers ("pass
``check_finite=False``"); each subcommand's ``func`` is wrapped with
:func:`in_cli_words`, which rewrites the message of any such error it raises
so that ``ntkdist`` prints the flag a command-line user can pass
(``--allow-nonfinite``).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable

from .._errors import NtkdistError

# Keyword settings the API advises, and the flag that makes each.
SETTINGS = {
    "check_finite=False": "--allow-nonfinite",
    "integer_inputs=True": "--integer-inputs",
    "check_independence=False": "--no-independence-check",
    "overwrite=True": "--overwrite",
    "allow_incomplete=True": "--allow-incomplete",
}
# Keywords whose value the message names (``memory_budget=2.0 MiB``), and the
# flag that takes that value.
VALUED = {
    "memory_budget": "--memory-budget",
    "tile": "--tile",
    "strategy": "--strategy",
    "cache": "--cache",
    "precision": "--precision",
    "workers": "--workers",
    "output": "--output",
}
_VALUED = re.compile(
    r"(?<![\w.])(" + "|".join(VALUED) + r")=('[^']*'|\"[^\"]*\"|[^\s,;)]*)"
)

_BARE = re.compile(
    r"(?<![\w.\-])(" + "|".join(k for k in VALUED if "_" in k) + r")\b(?!=)"
)


def cli_message(err: NtkdistError) -> str:
    """``err``'s message with its Python keywords said as CLI flags.

    Example:
        >>> from ntkdist._errors import InputError
        >>> cli_message(InputError("pass check_finite=False, or tile='64'"))
        'pass --allow-nonfinite, or --tile 64'
        >>> cli_message(InputError("raise memory_budget, or use output='trace'"))
        'raise --memory-budget, or use --output trace'
    """
    text = err.message_for(SETTINGS)

    def flag(m: re.Match[str]) -> str:
        value = m.group(2).strip("'\"")
        return f"{VALUED[m.group(1)]} {value}" if value else VALUED[m.group(1)]

    text = _VALUED.sub(flag, text)
    # A keyword named alone ("raise memory_budget"): only those no English
    # word could be mistaken for.
    return _BARE.sub(lambda m: VALUED[m.group(1)], text)


def in_cli_words(
    func: Callable[[argparse.Namespace], int | None],
) -> Callable[[argparse.Namespace], int | None]:
    """``func`` whose ntkdist errors speak of CLI flags (see :func:`cli_message`)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int | None:
        try:
            return func(args)
        except NtkdistError as err:
            err.args = (cli_message(err),)
            raise

    return run
