"""Strategy names, and ``auto``: the cheapest strategy that fits the memory given."""

from __future__ import annotations

from typing import Any

import jax

from .._errors import InputError, PlanError
from .._model import Model
from ._base import AbstractKernelStrategy, Cost
from ._jacobian import JacobianContraction
from ._structured import StructuredDerivatives
from ._vector_products import NtkVectorProducts

STRATEGIES: dict[str, type[AbstractKernelStrategy]] = {
    "jacobian": JacobianContraction,
    "ntvp": NtkVectorProducts,
    "structured": StructuredDerivatives,
}


def get(name: str | AbstractKernelStrategy) -> AbstractKernelStrategy:
    """The strategy called ``name`` (an instance is returned as it is)."""
    if isinstance(name, AbstractKernelStrategy):
        return name
    if name not in STRATEGIES:
        raise InputError(
            f"strategy={name!r} is not known; expected one of "
            f"{[*STRATEGIES, 'auto']} or an AbstractKernelStrategy instance."
        )
    return STRATEGIES[name]()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def choose(
    model: Model,
    params: Any,
    x: jax.Array,
    n1: int,
    n2: int,
    output: str,
    memory_budget: float | None = None,
) -> tuple[AbstractKernelStrategy, dict[str, Cost]]:
    """Pick the strategy with the fewest predicted FLOPs among those that fit.

    Costs come from each strategy's model of its own work, with the forward
    pass's FLOPs taken from XLA's cost analysis of the real model. Nothing is
    compiled or run.

    Raises:
        PlanError: no strategy fits ``memory_budget`` for an ``n1 × n2`` tile.
    """
    costs = {
        name: cls().cost(model, params, x, n1, n2, output)
        for name, cls in STRATEGIES.items()
    }
    fitting = {
        k: c
        for k, c in costs.items()
        if memory_budget is None or c.bytes <= memory_budget
    }
    if not fitting:
        need = min(costs.values(), key=lambda c: c.bytes).bytes
        raise PlanError(
            f"memory_budget={_fmt_bytes(memory_budget or 0)} cannot hold one "
            f"{n1}×{n2} tile of output={output!r} with any strategy (the smallest "
            f"needs {_fmt_bytes(need)}); raise the budget, use smaller tiles, or "
            f"use output='trace' or 'pntk'."
        )
    best = min(fitting, key=lambda k: (fitting[k].flops, k != "structured"))
    return STRATEGIES[best](), costs
