"""FLOPs of a jaxpr, counted from its equations, the same on every backend.

XLA's cost analysis depends on the backend: on GPUs the lowered module of a
convolutional network reports (next to) none of its convolutions' FLOPs, so a
cost model built on it alone would rank strategies as if the forward pass were
free. This count is the lower bound the cost models take with XLA's figure:
``2·out·K`` for a ``dot_general`` with ``K`` contracted elements and for a
convolution with ``K`` kernel elements per output, one per output element for
everything else, scans times their length, the costlier branch of a ``cond``,
and the body of a ``while_loop`` once (its trip count is not known).
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jcore

_JAXPRS = tuple({jcore.Jaxpr, jcore.ClosedJaxpr})


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of one evaluation of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> j = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((4, 3)), jnp.ones((3, 5)))
        >>> jaxpr_flops(j)
        120.0
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
    return total


def _size(var: Any) -> int:
    return math.prod(getattr(var.aval, "shape", ()))


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, _JAXPRS):
                found.append(item)
    return found


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        k = math.prod(lhs[i] for i in contract)
        return 2.0 * _size(eqn.outvars[0]) * k
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        k = math.prod(rhs) // max(1, rhs[out_feature])
        return 2.0 * _size(eqn.outvars[0]) * k
    subs = _subjaxprs(eqn.params)
    if subs:
        if name == "scan":
            return eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        if name == "cond":
            return max(jaxpr_flops(b) for b in eqn.params["branches"])
        return sum(jaxpr_flops(s) for s in subs)
    return float(sum(_size(v) for v in eqn.outvars))
