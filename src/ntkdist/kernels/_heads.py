"""Weight uses whose deltas are one per-sample vector times a fixed matrix.

A use's delta for output ``o`` is ``δ_o = ∂f_o/∂z``, with ``z`` the use's
output. When ``z`` reaches the network's output only through an elementwise
map ``h = φ(z, …)`` that feeds one linear *head* ``H`` (``f = c·(h @ W) + …``,
``W`` a parameter, the rest added or scaled by literals), the chain rule gives

    δ_o(x) = g(x) ⊙ m_o,    g = ∂h/∂z (a diagonal),  m_o = ∂f_o/∂h,

and ``m_o`` does not depend on ``x``. The ``trace`` kernel's share of such a
dense weight, ``(a1·a2) Σ_o ⟨δ1_o, δ2_o⟩``, then contracts over ``F`` instead
of ``O·F``: ``Σ_o ⟨δ1_o, δ2_o⟩ = ⟨q1, q2⟩`` with ``q = g ⊙ √(Σ_o m_o²)``.
``q`` comes from the deltas the factor pass computes anyway and the deltas
``m_o`` of a zero probe added to the head's activation:
``q = Σ_o δ_o ⊙ m_o / √(Σ_o m_o²)``. The last hidden layer of an MLP or of a
CNN's dense classifier is such a use; its share of a ``trace`` tile shrinks
``O``-fold.

The test is structural, on the model's top-level jaxpr: every value that
depends on ``z`` is made by an elementwise primitive (operands of one shape or
scalars), except the head's output, and the head's output reaches the
network's output through adds, literal scalings and reshapes only. Anything
else (a reduction, a second consumer, a skip to the output, a call) leaves the
use as it was, which is always correct.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from ._base import cotangents
from ._layouts import _layout
from ._walk import Analysis, Use, run

# Primitives that act entry by entry on operands of the output's shape (or
# scalars): their Jacobian with respect to any operand is diagonal.
_ELEMENTWISE = frozenset(
    {
        "abs", "add", "sub", "mul", "div", "neg", "max", "min", "pow",
        "integer_pow", "square", "sqrt", "rsqrt", "cbrt", "exp", "exp2",
        "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
        "erf", "erfc", "erf_inv", "atan", "sinh", "cosh", "asinh", "select_n",
        "clamp", "sign", "convert_element_type", "copy", "copy_p",
        "reduce_precision", "gt", "ge", "lt", "le", "eq", "ne",
        "is_finite", "stop_gradient", "nextafter", "floor", "ceil", "round",
    }
)  # fmt: skip
# What may lie between the head's output and the network's output: each keeps
# ∂f/∂y a fixed multiple of a fixed re-indexing.
_AFTER_HEAD = frozenset(
    {"add", "sub", "neg", "mul", "div", "convert_element_type", "copy", "copy_p",
     "reshape", "squeeze", "expand_dims"}
)  # fmt: skip


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.aval.shape)


def _is_elementwise(eqn: Any) -> bool:
    if len(eqn.outvars) != 1:
        return False
    out = _shape(eqn.outvars[0])
    if not all(_shape(v) in (out, ()) for v in eqn.invars):
        return False
    if eqn.primitive.name == "custom_jvp_call":
        return _custom_jvp_is_elementwise(eqn)
    return eqn.primitive.name in _ELEMENTWISE


def _custom_jvp_is_elementwise(eqn: Any) -> bool:
    """Whether a ``custom_jvp`` function of one array (``jax.nn.relu``) has a
    rule whose tangent map is elementwise: its derivative is the rule's, so
    the rule is what must be diagonal."""
    if eqn.params.get("num_consts", 0) != 0 or len(eqn.invars) != 1:
        return False
    try:
        if eqn.params.get("symbolic_zeros"):
            return False
        jaxpr, _, *_ = eqn.params["jvp_jaxpr_fun"].call_wrapped(False)
    except Exception:  # an unfamiliar rule representation: leave the use alone
        return False
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    if len(inner.invars) != 2 or len(inner.outvars) != 2:
        return False
    made = {inner.invars[1]}  # the tangent
    for e in inner.eqns:
        if any(not isinstance(v, jcore.Literal) and v in made for v in e.invars):
            if not _is_elementwise(e):
                return False
            made.update(e.outvars)
    return True  # a tangent output not made from the tangent is zero


def _is_literal_scalar(v: Any) -> bool:
    return isinstance(v, jcore.Literal) and _shape(v) == ()


def _reaches_output_linearly(
    eqns: Sequence[Any], start: int, out: Any, readers: dict[Any, list[int]]
) -> bool:
    """Whether the output of ``eqns[start]`` becomes ``out`` through one chain
    of adds of values not made from it, literal scalings, casts and reshapes,
    each value of the chain read once."""
    cur = eqns[start].outvars[0]
    while cur is not out:
        found = readers.get(cur, [])
        if len(found) != 1 or found[0] < 0:
            return False
        eqn = eqns[found[0]]
        name = eqn.primitive.name
        hits = [k for k, v in enumerate(eqn.invars) if v is cur]
        if len(hits) != 1 or name not in _AFTER_HEAD or len(eqn.outvars) != 1:
            return False
        (k,) = hits
        if name in ("mul", "div"):
            if (name == "div" and k != 0) or not _is_literal_scalar(eqn.invars[1 - k]):
                return False
        elif name in ("add", "sub") and _shape(eqn.outvars[0]) != _shape(cur):
            return False
        cur = eqn.outvars[0]
    return True


def _readers(jaxpr: Any) -> dict[Any, list[int]]:
    """The equations reading each variable, in order (the outputs as ``-1``)."""
    readers: dict[Any, list[int]] = {}
    for at, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                readers.setdefault(v, []).append(at)
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            readers.setdefault(v, []).append(-1)
    return readers


def diagonal_heads(
    jaxpr: Any, use_eqns: dict[int, int], act_pos: dict[int, int]
) -> dict[int, int]:
    """``{use: head}`` for the top-level uses whose deltas are ``g(x) ⊙ m_o``.

    Args:
        jaxpr: the model's per-sample (open) jaxpr.
        use_eqns: ``id(eqn) -> use index`` for the uses the walk recorded.
        act_pos: the activation operand's position in each use's equation.
    """
    if len(jaxpr.outvars) != 1 or isinstance(jaxpr.outvars[0], jcore.Literal):
        return {}
    (out,) = jaxpr.outvars
    readers = _readers(jaxpr)
    eqns = list(jaxpr.eqns)
    found: dict[int, int] = {}
    for start, eqn in enumerate(eqns):
        u = use_eqns.get(id(eqn))
        if u is None:
            continue
        head = _head_of(eqns, start, use_eqns, act_pos, out, readers)
        if head is not None and _reaches_output_linearly(eqns, head[1], out, readers):
            found[u] = head[0]
    return found


def _head_of(
    eqns: Sequence[Any],
    start: int,
    use_eqns: dict[int, int],
    act_pos: dict[int, int],
    out: Any,
    readers: dict[Any, list[int]],
) -> tuple[int, int] | None:
    """The one head use (and its equation's position) that the output of
    ``eqns[start]`` reaches through elementwise primitives alone, if so.

    Visits only the equations that read what it made, in order (a jaxpr is
    topologically sorted), so each use costs what it reaches, not the model.
    """
    z = eqns[start].outvars[0]
    made = {z}
    head = None
    todo = [at for at in readers.get(z, []) if at >= 0]
    heapq.heapify(todo)
    seen: set[int] = set()
    while todo:
        at = heapq.heappop(todo)
        if at in seen:
            continue
        seen.add(at)
        eqn = eqns[at]
        ins = [
            k
            for k, v in enumerate(eqn.invars)
            if not isinstance(v, jcore.Literal) and v in made
        ]
        if not ins:
            continue
        h = use_eqns.get(id(eqn))
        if h is not None and eqn.primitive.name == "dot_general":
            if head is not None or ins != [act_pos[h]]:
                return None
            head = (h, at)
            continue
        if not _is_elementwise(eqn):
            return None
        made.update(eqn.outvars)
        for v in eqn.outvars:
            for r in readers.get(v, []):
                if r >= 0:
                    heapq.heappush(todo, r)
    if head is None or out in made:
        return None
    return head


def folded_delta(delta: jax.Array, m: jax.Array) -> jax.Array:
    """``[1, *out]``: the ``O`` deltas ``g ⊙ m_o`` of a use folded into one
    vector ``q = g ⊙ √(Σ_o m_o²) / √O``, so that ``⟨q1, q2⟩`` is the ``trace``'s
    ``Σ_o ⟨δ1_o, δ2_o⟩ / O``. ``m[o]`` is ``∂f_o/∂h`` at the head's activation
    ``h``, the same for every sample (see ``_heads``)."""
    o = delta.shape[0]
    w = jnp.sum(m * m, axis=0) * o
    # Where w = 0 every δ_o is 0 too, and so is the numerator.
    q = jnp.sum(delta * m, axis=0) * lax.rsqrt(jnp.maximum(w, jnp.finfo(w.dtype).tiny))
    return q[None]


def head_for(uses: Sequence[Use], heads: dict[int, int], output: str) -> int | None:
    """The head folding this weight's deltas, for a dense weight used once."""
    if output != "trace" or len(uses) != 1 or uses[0].index not in heads:
        return None
    lay = _layout(uses[0])
    if lay.signature is None or lay.b != 1 or lay.t != 1 or uses[0].steps != 1:
        return None
    return heads[uses[0].index]


def head_deltas(
    an: Analysis,
    leaves: list[Any],
    x: jax.Array,
    output: str,
    heads: set[int | None],
    uses: dict[int, Use],
) -> dict[int, jax.Array]:
    """``∂f_o/∂h`` at each folding head's activation ``h``, ``[o, *h]``.

    The same for every sample (see ``_heads``), so it comes from the first
    sample alone, outside the per-sample factor pass.
    """
    found = sorted(h for h in heads if h is not None)
    if not found:
        return {}
    zeros = {h: jnp.zeros(uses[h].act_shape, uses[h].dtype) for h in found}

    def f(act_probes: Any) -> jax.Array:
        out, _, _ = run(an, leaves, x[:1], {}, frozenset(), act_probes)
        return out.reshape(-1)

    out, vjp = jax.vjp(f, zeros)
    (m,) = jax.vmap(vjp)(cotangents(output, out.shape[0], out.dtype))
    return m
