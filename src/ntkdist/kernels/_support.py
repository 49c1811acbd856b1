"""Which strategies can compute a model's kernel, and why one cannot.

Every strategy differentiates the model with JAX, so each inherits JAX's
limits: reverse mode stops at a ``lax.while_loop`` that parameters flow into,
forward mode stops at a ``custom_vjp`` rule. A strategy that cannot handle a
model fails while JAX traces it, before any work is done; this module turns
such a failure into a :class:`~ntkdist.ModelError` that names the construct
(its primitive and where in the model it is) and says what to do instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from .._errors import ModelError, NtkdistError
from .._model import Model

# JAX's own words for the two limits (matched to name the construct).
_REVERSE_WHILE = "Reverse-mode differentiation does not work for lax.while_loop"
_FORWARD_CUSTOM_VJP = "can't apply forward-mode autodiff (jvp) to a custom_vjp"

# Calls whose sub-jaxpr receives the call's operands in order.
_CALL_JAXPRS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


@dataclasses.dataclass(frozen=True)
class Construct:
    """A primitive that parameters flow into, and where the model calls it."""

    primitive: str
    where: str
    label: str = ""

    def __str__(self) -> str:
        names = {
            "while": "lax.while_loop",
            "custom_vjp_call": "a jax.custom_vjp function",
            "custom_vjp_call_jaxpr": "a jax.custom_vjp function",
            "custom_jvp_call": "a jax.custom_jvp function",
        }
        name = names.get(self.primitive, self.primitive)
        label = f" ({self.label})" if self.label else ""
        return f"{name}{label} at {self.where}"


def is_failure_to_trace(err: BaseException) -> bool:
    """Whether ``err`` says a strategy cannot handle the model (rather than a
    run-time failure such as running out of memory, or a user error)."""
    if not isinstance(err, Exception):
        return False
    if isinstance(err, jax.errors.JaxRuntimeError | MemoryError):
        return False
    return not isinstance(err, NtkdistError) or isinstance(err, ModelError)


def _sub_jaxprs(value: Any) -> Iterator[jcore.Jaxpr]:
    if isinstance(value, jcore.Jaxpr):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def contains_primitive(jaxpr: Any, names: frozenset[str]) -> bool:
    """Whether any equation of ``jaxpr`` (at any depth) binds one of ``names``."""
    inner = jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr
    for eqn in inner.eqns:
        if eqn.primitive.name in names:
            return True
        for v in eqn.params.values():
            if any(contains_primitive(j, names) for j in _sub_jaxprs(v)):
                return True
    return False


def _where(eqn: Any) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # a private API: the location is a courtesy
        return "an unknown place"


def _rule_name(eqn: Any) -> str:
    for key in ("call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        inner = getattr(sub, "jaxpr", sub)
        info = getattr(inner, "debug_info", None)
        if info is not None:
            return str(getattr(info, "func_name", "") or "")
    return ""


def _taint(
    jaxpr: jcore.Jaxpr, tainted: list[bool], found: list[Construct]
) -> list[bool]:
    """Propagate "depends on a parameter" through ``jaxpr``; record constructs."""
    env: dict[Any, bool] = {}
    for v, t in zip(jaxpr.invars, tainted, strict=True):
        env[v] = t

    def get(v: Any) -> bool:
        return False if isinstance(v, jcore.Literal) else env.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if any(ins) and name in ("while", *_CUSTOM):
            label = _rule_name(eqn) if name in _CUSTOM else ""
            found.append(Construct(name, _where(eqn), label))
        if any(ins) and name in _CALL_JAXPRS:
            sub = eqn.params[_CALL_JAXPRS[name]]
            inner = sub.jaxpr if hasattr(sub, "consts") else sub
            outs = _taint(inner, ins, found)
        elif any(ins) and name == "scan":
            inner = eqn.params["jaxpr"].jaxpr
            outs = _taint(inner, [any(ins)] * len(inner.invars), found)
        elif any(ins) and name == "cond":
            outs = [any(ins)] * len(eqn.outvars)
            for branch in eqn.params["branches"]:
                _taint(branch.jaxpr, [any(ins)] * len(branch.jaxpr.invars), found)
        else:
            outs = [any(ins)] * len(eqn.outvars)
        for v, t in zip(eqn.outvars, outs, strict=True):
            env[v] = t
    return [get(v) for v in jaxpr.outvars]


def constructs(model: Model, params: Any, x: Any) -> list[Construct]:
    """``while_loop``s and custom-rule calls that parameters flow into."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def g(leaves: list[Any], x: Any) -> Any:
        return model(jax.tree_util.tree_unflatten(treedef, leaves), x)

    avals = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves]
    x_one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    closed = jax.make_jaxpr(g)(avals, x_one)
    found: list[Construct] = []
    _taint(closed.jaxpr, [True] * len(leaves) + [False], found)
    return list(dict.fromkeys(found))


def refusal(
    strategy: str, model: Model, params: Any, x: Any, err: BaseException
) -> ModelError:
    """The :class:`ModelError` for ``strategy`` failing on ``model`` with ``err``."""
    text = str(err)
    try:
        found = constructs(model, params, x)
    except Exception:
        found = []
    rules = [c for c in found if c.primitive.startswith("custom_vjp")]
    if _REVERSE_WHILE in text and not any(c.primitive == "while" for c in found):
        # The loop is inside a custom rule, which this strategy differentiated.
        where = "; ".join(map(str, rules)) or "a custom rule"
        return ModelError(
            f"strategy {strategy!r} differentiates the backward pass of {where} "
            "(ntvp forms J(x1)·u as the transpose of a vjp), and that backward "
            "pass runs a lax.while_loop, which JAX cannot reverse-differentiate. "
            "Use strategy='structured' or 'jacobian', which only apply the rule."
        )
    if _REVERSE_WHILE in text:
        loops = [c for c in found if c.primitive == "while"]
        where = "; ".join(map(str, loops))
        return ModelError(
            f"parameters flow into {where}: JAX has no reverse-mode derivative "
            "of a while_loop (jax.jacrev fails on this model too), so no "
            "strategy can compute its kernel. Use lax.scan or lax.fori_loop with "
            "a static trip count, or give the loop a custom_vjp/custom_jvp rule "
            "(for a fixed point, the implicit-function-theorem rule)."
        )
    if _FORWARD_CUSTOM_VJP in text:
        where = "; ".join(map(str, rules)) or "a jax.custom_vjp function"
        return ModelError(
            f"strategy {strategy!r} needs forward-mode derivatives, which JAX "
            f"cannot take through {where}; use strategy='ntvp' with "
            "mode='reverse' (the default 'auto' mode), 'structured' or 'jacobian'."
        )
    near = f" (parameters flow into {'; '.join(map(str, found))})" if found else ""
    return ModelError(
        f"strategy {strategy!r} cannot compute this model's kernel{near}: it "
        f"failed while tracing the model with {type(err).__name__}: "
        f"{text.splitlines()[0] if text else ''}. That is a limit (or a bug) of "
        "this strategy, not of the model: use strategy='jacobian', which works "
        "wherever jax.jacrev of the model does."
    )


def all_refused(refusals: dict[str, ModelError]) -> ModelError:
    """One error for ``auto`` when every strategy refused the model."""
    if not refusals:
        return ModelError("no strategy could compute this model's kernel.")
    jac = refusals.get("jacobian")
    lines = "\n".join(f"  {name}: {err}" for name, err in refusals.items())
    first = f"{jac}\n" if jac is not None else ""
    return ModelError(f"{first}No strategy can compute this kernel:\n{lines}")


@functools.lru_cache(maxsize=64)
def _check_traced(
    strategy: Any,
    model: Model,
    treedef: Any,
    leaf_avals: tuple[Any, ...],
    x_aval: tuple[Any, ...],
    output: str,
    precision: str | None,
) -> None:
    from ._base import _tile_impl

    avals = [jax.ShapeDtypeStruct(s, d) for s, d in leaf_avals]
    params = jax.tree_util.tree_unflatten(treedef, avals)
    x = jax.ShapeDtypeStruct(*x_aval)
    jax.eval_shape(
        lambda p, a, b: _tile_impl(strategy, model, output, p, a, b), params, x, x
    )


def check_supported(
    strategy: Any, model: Model, params: Any, x: Any, output: str
) -> None:
    """Trace one ``1 × 1`` tile of ``strategy`` (no FLOPs run); raise its refusal.

    Raises:
        ModelError: ``strategy`` cannot compute this model's kernel.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_avals = tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in leaves)
    x_aval = ((1, *x.shape[1:]), jnp.result_type(x))
    precision = jax.config.jax_default_matmul_precision
    try:
        _check_traced(strategy, model, treedef, leaf_avals, x_aval, output, precision)
    except Exception as err:
        if not is_failure_to_trace(err):
            raise
        raise refusal(strategy.name, model, params, x, err) from err
