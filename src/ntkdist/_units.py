"""Byte sizes: one parser for every ``memory_budget``-like argument, one formatter.

Pure Python, so the planner may import it.
"""

from __future__ import annotations

import math
import re

from ._errors import InputError

# Decimal and binary units, case-insensitive; a bare letter is decimal, as in
# dask's ``parse_bytes`` ("4G" is 4e9 bytes, "4GiB" is 4·2**30).
_UNITS = {
    "": 1,
    "b": 1,
    **{f"{p}{s}": 10 ** (3 * k) for k, p in enumerate("kmgtp", 1) for s in ("", "b")},
    **{f"{p}i{s}": 2 ** (10 * k) for k, p in enumerate("kmgtp", 1) for s in ("", "b")},
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)?\s*([a-zA-Z]*)\s*")


def parse_bytes(
    value: str | float | None, *, name: str = "memory_budget"
) -> float | None:
    """``"2GiB"`` -> ``2147483648.0``; numbers pass through; ``None`` stays ``None``.

    Args:
        value: a number of bytes, or a string such as ``"512MiB"``, ``"4GB"``
            or ``"1.5 KiB"`` (units are case-insensitive; ``"G"`` is ``GB``).
        name: the argument's name, for the error message.

    Returns:
        The size in bytes as a float, or ``None``.

    Raises:
        InputError: ``value`` is not a size, or is negative or not finite.

    Example:
        >>> parse_bytes("1.5 KiB")
        1536.0
        >>> parse_bytes(2e9), parse_bytes(None)
        (2000000000.0, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS or (m.group(1) is None and not unit):
            raise _not_a_size(value, name)
        size = float(m.group(1) or 1) * _UNITS[unit]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        size = float(value)
    else:
        raise _not_a_size(value, name)
    if not math.isfinite(size) or size < 0:
        raise InputError(f"{name}={value!r} must be a finite, non-negative size.")
    return size


def _not_a_size(value: object, name: str) -> InputError:
    return InputError(
        f"{name}={value!r} is not a size; expected a number of bytes or a string "
        "such as '512MiB', '2GiB' or '4GB'."
    )


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, one decimal).

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(100)
        ('3.0 GiB', '100 B')
    """
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
