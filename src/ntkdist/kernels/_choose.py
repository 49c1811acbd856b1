"""Strategy names, and ``auto``: the cheapest strategy that fits the memory given
and can compute the model (one that cannot never takes ``auto`` down with it)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._errors import InputError, ModelError, PlanError
from .._model import Model
from .._planner._budget import XLA_HEADROOM, smaller_output
from .._units import format_bytes
from ._base import AbstractKernelStrategy, Cost, _tile
from ._jacobian import JacobianContraction
from ._jit import buffer_bytes
from ._structured import StructuredDerivatives
from ._support import all_refused, check_supported, is_failure_to_trace, refusal
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


_STRUCTURED = re.compile(r"StructuredDerivatives\(nominal_tile=(\d+), mode='(\w+)'\)")


def from_record(name: str, text: str = "") -> AbstractKernelStrategy:
    """The built-in strategy ``name`` as recorded by its ``repr`` ``text``:
    ``structured`` keeps the nominal tile and mode its rules were chosen with.

    Example:
        >>> text = "StructuredDerivatives(nominal_tile=32, mode='auto')"
        >>> from_record("structured", text)
        StructuredDerivatives(nominal_tile=32, mode='auto')
        >>> from_record("jacobian").name
        'jacobian'
    """
    match = _STRUCTURED.fullmatch(text or "") if name == "structured" else None
    if match:
        return StructuredDerivatives(nominal_tile=int(match[1]), mode=match[2])
    return get(name)


def for_tile(
    strategy: str | AbstractKernelStrategy, n1: int, n2: int
) -> AbstractKernelStrategy:
    """``strategy`` for one ``n1 × n2`` tile computed on its own (``ntk``,
    ``ntk_fn``): ``structured`` chooses between the gram rule and per-weight
    rows at that tile's size. (The engine's tiles share factors across tiles of
    one job, so there the choice is made once, at the nominal tile.) An
    instance is returned as it is."""
    if isinstance(strategy, str) and strategy == "structured":
        # Rows are built once per sample and contracted once per pair: per
        # pair their build costs 2·build/nominal at nominal = 2·n1·n2/(n1+n2).
        nominal = max(1, round(2 * n1 * n2 / max(1, n1 + n2)))
        return StructuredDerivatives(nominal_tile=nominal)
    return get(strategy)


def rank(
    model: Model,
    params: Any,
    x: jax.Array,
    n1: int,
    n2: int,
    output: str,
    memory_budget: float | None = None,
    *,
    one_tile: bool = False,
) -> tuple[list[str], dict[str, Cost], dict[str, ModelError]]:
    """Strategies that fit ``memory_budget``, cheapest predicted FLOPs first.

    Costs come from each strategy's model of its own work, with the forward
    pass's FLOPs taken from XLA's cost analysis of the real model. Nothing is
    compiled or run. A strategy whose cost cannot even be modelled (its walk of
    the model fails) is left out, with its refusal.

    With ``one_tile``, each strategy is costed as :func:`for_tile` makes it.

    Returns:
        ``(names, costs, refusals)``.

    Raises:
        PlanError: no strategy fits ``memory_budget`` for an ``n1 × n2`` tile.
    """
    costs: dict[str, Cost] = {}
    refusals: dict[str, ModelError] = {}
    for name, cls in STRATEGIES.items():
        strategy = for_tile(name, n1, n2) if one_tile else cls()
        try:
            costs[name] = strategy.cost(model, params, x, n1, n2, output)
        except Exception as err:
            if not is_failure_to_trace(err):
                raise
            refusals[name] = refusal(name, model, params, x, err)
    if not costs:
        raise all_refused(refusals)
    fitting = {
        k: c
        for k, c in costs.items()
        if memory_budget is None or c.bytes <= memory_budget
    }
    if not fitting:
        need = min(costs.values(), key=lambda c: c.bytes).bytes
        raise PlanError(
            f"memory_budget={format_bytes(memory_budget or 0)} cannot hold one "
            f"{n1}×{n2} tile of output={output!r} with any strategy (the smallest "
            f"needs {format_bytes(need)}); raise the budget or use smaller tiles"
            + (
                "."
                if output in ("trace", "pntk")
                else ", or use output='trace' or 'pntk'."
            )
        )
    names = sorted(fitting, key=lambda k: (fitting[k].flops, k != "structured"))
    return names, costs, refusals


def choose(
    model: Model,
    params: Any,
    x: jax.Array,
    n1: int,
    n2: int,
    output: str,
    memory_budget: float | None = None,
    *,
    one_tile: bool = False,
) -> tuple[AbstractKernelStrategy, dict[str, Cost]]:
    """Pick the strategy with the fewest predicted FLOPs among those that fit
    and that can compute this model (each candidate is traced on a ``1 × 1``
    tile, in cost order, until one succeeds). With ``one_tile``, candidates
    are made by :func:`for_tile`, as ``ntk`` runs them.

    Raises:
        PlanError: no strategy fits ``memory_budget`` for an ``n1 × n2`` tile.
        ModelError: no strategy can compute this model's kernel.
    """
    names, costs, refusals = rank(
        model, params, x, n1, n2, output, memory_budget, one_tile=one_tile
    )
    for name in names:
        strategy = for_tile(name, n1, n2) if one_tile else STRATEGIES[name]()
        try:
            check_supported(strategy, model, params, x, output)
        except ModelError as err:
            refusals[name] = err
            continue
        return strategy, costs
    raise all_refused(refusals)


def run_first(
    strategy: str | AbstractKernelStrategy,
    model: Model,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None,
    output: str,
    memory_budget: float | None,
    run: Callable[[AbstractKernelStrategy], Any],
) -> tuple[AbstractKernelStrategy, Any]:
    """``run(s)`` for the strategy asked for, or ``auto``'s along the cost order.

    The tile ``x1 × x2`` is computed on its own, so each candidate is the one
    :func:`for_tile` makes for its size. A strategy that cannot handle the
    model fails while JAX traces it, before any work: ``auto`` then moves on
    to the next cheapest, and an explicitly requested strategy raises a
    :class:`ModelError` naming the construct. With a ``memory_budget``,
    ``auto`` compiles each candidate's tile program first and passes over one
    whose buffers (:func:`tile_bytes`) exceed it.

    Returns:
        The strategy that ran, and what ``run`` returned.

    Raises:
        PlanError: no candidate's program fits ``memory_budget``.
    """
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    costs: dict[str, Cost] = {}
    if strategy != "auto":
        candidates, refusals = [for_tile(strategy, n1, n2)], {}
    else:
        # The budget is checked on each candidate's compiled program below;
        # the cost model only orders them.
        names, costs, refusals = rank(
            model, params, x1, n1, n2, output, None, one_tile=True
        )
        candidates = [for_tile(name, n1, n2) for name in names]
    needs: dict[str, float] = {}
    for cand in candidates:
        try:
            if strategy == "auto" and memory_budget is not None:
                need = tile_bytes(cand, model, params, x1, x2, output)
                if need is None:  # no buffer assignment here: the model's
                    need = costs[cand.name].bytes
                if need > memory_budget:
                    needs[cand.name] = need
                    continue
            return cand, run(cand)
        except Exception as err:
            if not is_failure_to_trace(err):
                raise
            refused = refusal(cand.name, model, params, x1, err)
            if strategy != "auto":
                raise refused from err
            refusals[cand.name] = refused
    if needs:
        raise PlanError(
            f"memory_budget={format_bytes(memory_budget or 0)} cannot hold one "
            f"{n1}×{n2} tile of output={output!r} with any strategy ("
            + ", ".join(f"{k} needs {format_bytes(v)}" for k, v in needs.items())
            + ", as XLA compiles its program); raise the budget or use smaller "
            "tiles" + smaller_output(output) + "."
        )
    raise all_refused(refusals)


def tile_bytes(
    strategy: AbstractKernelStrategy,
    model: Model,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None,
    output: str,
) -> float | None:
    """The bytes one tile's program holds, from the buffers XLA assigns it when
    it compiles it (``XLA_HEADROOM`` times those); jit's cache keeps the
    program for the call. ``None`` where the backend reports no assignment."""
    spec = lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v))
    args = jax.tree_util.tree_map(spec, (params, x1, x2))
    found = buffer_bytes(_tile.lower(strategy, model, output, *args).compile())
    return None if found is None else XLA_HEADROOM * found
