"""Walk a model's jaxpr to find weight uses, then re-run it with probes on them.

Structured derivatives need, for every place a parameter is consumed as the
weight of a bilinear primitive (``dot_general``, ``conv_general_dilated``),
the other operand (the *activation*) and the cotangent of the primitive's
output (the *delta*). This module gets both from any JAX function:

1. ``analyse`` interprets the per-sample jaxpr abstractly, tagging each value
   with where it came from. A value is a *chain* of leaf ``k`` when it equals
   ``scale * L(leaf_k)`` for ``L`` a composition of reshapes, transposes, dtype
   casts and scalings by constants: such ``L`` preserve Frobenius inner
   products up to ``scale**2``, so the leaf's NTK equals ``scale**2`` times the
   NTK of the chain value. Every use of a chain value as a weight is recorded.
   A chain value consumed any other way (a bias add, a norm scale, a weight
   used outside a rule) sends its leaf to the explicit-Jacobian fallback.
2. ``run`` evaluates the same jaxpr concretely, in the same order, adding a
   zero *probe* to the output of each recorded use and returning the
   activations. The gradient of the output with respect to a probe is the
   use's delta.

Calls (``jit``, ``checkpoint``/``remat``, ``closed_call``) that receive chain
values are inlined, so weights used inside them get structured rules too. A
``lax.scan`` whose body uses a weight it closes over is a weight used at every
step: the scan stays a scan (never unrolled, so a 10,000-step RNN compiles like
a 10-step one), each probe travels in as one more scanned input and each
activation comes out as one more scanned output, and the use is recorded with
``steps = length`` (its positions ``T`` are the steps times the per-step
positions). Anything else that consumes a chain value (``while``, ``cond``, a
weight carried or scanned over) is bound unchanged and its leaves fall back to
explicit Jacobians, which is always correct.

Custom derivative rules (``custom_jvp``, ``custom_vjp``) are never inlined: the
rule is the derivative its author means (a straight-through estimator, an
implicit layer whose primal is a ``while_loop``), and differentiating the primal
instead would give another kernel or none. A call that receives a chain value is
bound unchanged, so its leaves get explicit Jacobian rows through the rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# Primitives that map a chain value to a chain value. mul/div only with a
# constant scalar; handled separately.
_PERMUTING = {
    "reshape",
    "transpose",
    "convert_element_type",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reduce_precision",
}
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Tag:
    """Where a value came from during the walk.

    Attributes:
        data: the value depends on the model input.
        chain: for values equal to ``scale * L(leaf)``, a hashable
            ``(leaf, ops)`` signature; ``None`` otherwise.
        spread: for a chain value broadcast along new axes (a bias about to be
            added), the ``broadcast_dimensions``; such a value has a rule only
            as an operand of ``add``.
    """

    data: bool = False
    chain: tuple[int, tuple[Any, ...]] | None = None
    spread: tuple[int, ...] | None = None


CONST = Tag()
DATA = Tag(data=True)


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a (chain of a) parameter leaf as the weight of a bilinear op.

    Attributes:
        index: position of the use in walk order.
        leaf: index of the parameter leaf in the flattened params.
        chain: signature of the reshapes/transposes/scalings from leaf to weight.
        primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
        weight_pos: 0 if the weight is the lhs operand, 1 if the rhs.
        params: the primitive's bind parameters.
        act_shape: per-sample shape of the activation operand.
        weight_shape: shape of the weight operand.
        out_shape: per-sample shape of the primitive's output.
        dtype: dtype of the output.
        bind: binds the primitive on ``(weight, act)`` in its operand order.
        steps: how many scan steps use it (the product over nested scans);
            its activations, probes and deltas carry a leading ``steps`` axis
            when ``steps > 1``.
    """

    index: int
    leaf: int
    chain: tuple[Any, ...]
    primitive: str
    weight_pos: int
    params: dict[str, Any] = dataclasses.field(compare=False, hash=False)
    act_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: Any
    bind: Callable[..., jax.Array] = dataclasses.field(compare=False, hash=False)
    steps: int = 1


@dataclasses.dataclass(frozen=True)
class Bias:
    """A (chain of a) leaf added to the output of a weight use: ``z = y + b``.

    The cotangent of ``z`` is the use's delta when ``y`` feeds only this add, so
    the bias joins its weight's gram rule as one more activation column (the
    constant ``scale``). Such biases cost nothing beyond their weight.

    Attributes:
        index: position in walk order (shared with :class:`Use`).
        leaf: index of the parameter leaf.
        chain: signature of the ops from leaf to the added value.
        shape: the added value's shape as seen from ``z``: ``z``'s size along
            the axes it varies on, 1 along the axes it is constant on.
        partner: index of the :class:`Use` whose output is ``y``.
    """

    index: int
    leaf: int
    chain: tuple[Any, ...]
    shape: tuple[int, ...]
    partner: int


@dataclasses.dataclass
class _Walk:
    """State of one walk: either abstract analysis or a probed evaluation."""

    probes: Sequence[jax.Array] | None = None  # indexed by use index
    active: frozenset[int] = frozenset()
    uses: list[Use] = dataclasses.field(default_factory=list)
    biases: list[Bias] = dataclasses.field(default_factory=list)
    use_out: dict[Any, int] = dataclasses.field(default_factory=dict)
    # A use's output times a non-zero literal: the factor, for a bias added to it.
    out_factor: dict[Any, float] = dataclasses.field(default_factory=dict)
    reads: dict[Any, int] = dataclasses.field(default_factory=dict)
    fallback: set[int] = dataclasses.field(default_factory=set)
    acts: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    scales: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    counter: int = 0
    steps: int = 1  # scan steps around the equation being walked
    # Scans in walk order: the use index and scan number each one ends at.
    spans: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    scans: int = 0
    steps_of: dict[int, int] = dataclasses.field(default_factory=dict)
    # Uses by equation (for ``_heads``) and zero probes on heads' activations.
    use_eqns: dict[int, int] = dataclasses.field(default_factory=dict)
    act_pos: dict[int, int] = dataclasses.field(default_factory=dict)
    act_probes: dict[int, jax.Array] = dataclasses.field(default_factory=dict)

    # -- the interpreter -------------------------------------------------

    def eval(
        self,
        jaxpr: jcore.Jaxpr,
        consts: Sequence[Any],
        args: Sequence[Any],
        tags: Sequence[Tag],
        scales: Sequence[Any],
    ) -> tuple[list[Any], list[Tag], list[Any]]:
        env: dict[Any, tuple[Any, Tag, Any]] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = (c, CONST, None)
        for v, a, t, s in zip(jaxpr.invars, args, tags, scales, strict=True):
            env[v] = (a, t, s)
        for e in jaxpr.eqns:
            for v in e.invars:
                if not isinstance(v, jcore.Literal):
                    self.reads[v] = self.reads.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not isinstance(v, jcore.Literal):
                self.reads[v] = self.reads.get(v, 0) + 1

        def read(v: Any) -> tuple[Any, Tag, Any]:
            if isinstance(v, jcore.Literal):
                return v.val, CONST, None
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self._eqn(
                eqn, [i[0] for i in ins], [i[1] for i in ins], [i[2] for i in ins]
            )
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        res = [read(v) for v in jaxpr.outvars]
        return [r[0] for r in res], [r[1] for r in res], [r[2] for r in res]

    def _eqn(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any]
    ) -> list[tuple[Any, Tag, Any]]:
        name = eqn.primitive.name
        chains = [i for i, t in enumerate(tags) if t.chain is not None]
        data = any(t.data for t in tags)
        if not chains:
            if name == "mul":
                self._scaled_output(eqn)
            return [(o, DATA if data else CONST, None) for o in _bind(eqn, vals)]
        if name == "add" and len(chains) == 1 and not tags[1 - chains[0]].chain:
            biased = self._bias(eqn, vals, tags, scales, chains[0])
            if biased is not None:
                return [biased]
        if name in ("add", "sub") and len(chains) == 1:
            shifted = self._shifted(eqn, vals, tags, scales, chains[0])
            if shifted is not None:
                return [shifted]
        spread = any(tags[i].spread is not None for i in chains)
        if spread:
            pass  # a broadcast chain has no rule but as a bias: fall through
        elif name == "broadcast_in_dim" and _is_pure_broadcast(eqn):
            (out,) = _bind(eqn, vals)
            dims = tuple(eqn.params["broadcast_dimensions"])
            return [(out, Tag(chain=tags[0].chain, spread=dims), scales[0])]
        elif len(vals) == 1 and (name in _PERMUTING or _is_unit_broadcast(eqn)):
            (out,) = _bind(eqn, vals)
            leaf, ops = tags[0].chain  # type: ignore[misc]
            sig = (name, tuple(sorted((k, repr(v)) for k, v in eqn.params.items())))
            return [(out, Tag(chain=(leaf, (*ops, sig))), scales[0])]
        if name in ("mul", "div", "neg") and len(chains) == 1 and not spread:
            scaled = self._scaled(eqn, vals, tags, scales, chains[0])
            if scaled is not None:
                return [scaled]
        if (
            name in ("dot_general", "conv_general_dilated")
            and len(chains) == 1
            and (not spread)
        ):
            w = chains[0]
            if not (name == "conv_general_dilated" and w == 0):
                return [self._use(eqn, vals, tags, scales, w)]
        if name in _CALLS:
            sub = eqn.params[_CALLS[name]]
            closed = sub if hasattr(sub, "consts") else None
            inner = closed.jaxpr if closed is not None else sub
            consts = closed.consts if closed is not None else []
            outs, otags, oscales = self.eval(inner, consts, vals, tags, scales)
            return list(zip(outs, otags, oscales, strict=True))
        if name == "scan" and eqn.params["length"] > 0:
            return self._scan(eqn, vals, tags, scales)
        # Consumed by something with no rule: these leaves use explicit Jacobians.
        for i in chains:
            self.fallback.add(tags[i].chain[0])  # type: ignore[index]
        return [(o, DATA if data else CONST, None) for o in _bind(eqn, vals)]

    def _bias(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any], b: int
    ) -> tuple[Any, Tag, Any] | None:
        other = eqn.invars[1 - b]
        if isinstance(other, jcore.Literal) or self.steps > 1:
            return None
        partner = self.use_out.get(other)
        if partner is None or self.reads.get(other) != 1:
            return None
        factor = self.out_factor.get(other)
        (out,) = _bind(eqn, vals)
        spread = tags[b].spread
        if spread is not None:
            shape = tuple(n if d in spread else 1 for d, n in enumerate(out.shape))
        elif jnp.ndim(vals[b]) == out.ndim:  # add broadcasts size-1 axes itself
            shape = tuple(jnp.shape(vals[b]))
        else:
            return None
        idx = self.counter
        self.counter += 1
        leaf, ops = tags[b].chain  # type: ignore[misc]
        if self.probes is None:
            self.biases.append(Bias(idx, leaf, ops, shape, partner))
        elif idx in self.active:
            # Added to c·y, the bias's cotangent is (1/c) times the use's delta.
            scale = scales[b] if factor is None else _mul(scales[b], 1.0 / factor)
            self.scales[idx] = scale
        return out, DATA, None

    def _scaled_output(self, eqn: Any) -> None:
        """``c·y`` with ``y`` a use's output read only here and ``c`` a non-zero
        literal scalar (an NTK-parameterised layer): a bias added to it still
        folds into the use's gram rule, as the column ``scale / c``."""
        for k in (0, 1):
            lit, var = eqn.invars[k], eqn.invars[1 - k]
            if not isinstance(lit, jcore.Literal) or isinstance(var, jcore.Literal):
                continue
            partner = self.use_out.get(var)
            value = lit.val
            if (
                partner is None
                or self.reads.get(var) != 1
                or jnp.ndim(value) != 0
                or not jnp.issubdtype(jnp.result_type(value), jnp.floating)
                or float(value) == 0.0
            ):
                continue
            out = eqn.outvars[0]
            self.use_out[out] = partner
            self.out_factor[out] = self.out_factor.get(var, 1.0) * float(value)
            return

    def _shifted(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any], w: int
    ) -> tuple[Any, Tag, Any] | None:
        """``c ± L(leaf)`` with ``c`` a constant: the derivative is ``±L``'s.

        Adding a constant changes the value a weight has, not its derivative,
        so the sum is still a chain of the leaf (``1 + gain`` norm gains).
        """
        other = 1 - w
        if tags[other].data or tags[w].spread is not None:
            return None
        (out,) = _bind(eqn, vals)
        if tuple(jnp.shape(out)) != tuple(jnp.shape(vals[w])):
            return None  # the constant broadcasts the chain: no longer a chain
        leaf, ops = tags[w].chain  # type: ignore[misc]
        if eqn.primitive.name == "sub" and w == 1:
            return out, Tag(chain=(leaf, (*ops, ("neg",)))), _mul(scales[w], -1.0)
        return out, Tag(chain=(leaf, ops)), scales[w]

    def _scaled(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any], w: int
    ) -> tuple[Any, Tag, Any] | None:
        name = eqn.primitive.name
        leaf, ops = tags[w].chain  # type: ignore[misc]
        if name == "neg":
            (out,) = _bind(eqn, vals)
            return out, Tag(chain=(leaf, (*ops, ("neg",)))), _mul(scales[w], -1.0)
        other = 1 - w
        if tags[other].data or jnp.ndim(vals[other]) != 0:
            return None
        if name == "div" and w == 1:
            return None
        (out,) = _bind(eqn, vals)
        var = eqn.invars[other]
        key = repr(var.val) if isinstance(var, jcore.Literal) else f"var{id(var)}"
        factor = vals[other] if name == "mul" else 1.0 / vals[other]
        return out, Tag(chain=(leaf, (*ops, (name, key)))), _mul(scales[w], factor)

    def _use(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any], w: int
    ) -> tuple[Any, Tag, Any]:
        idx = self.counter
        self.counter += 1
        if idx in self.act_probes:  # a head's activation: its delta is ∂f/∂h
            vals = list(vals)
            vals[1 - w] = vals[1 - w] + self.act_probes[idx].astype(vals[1 - w].dtype)
        (out,) = _bind(eqn, vals)
        self.use_out[eqn.outvars[0]] = idx
        leaf, ops = tags[w].chain  # type: ignore[misc]
        act = vals[1 - w]
        if self.probes is None:
            self.use_eqns[id(eqn)] = idx
            self.act_pos[idx] = 1 - w
            self.uses.append(
                Use(
                    index=idx,
                    leaf=leaf,
                    chain=ops,
                    primitive=eqn.primitive.name,
                    weight_pos=w,
                    params=dict(eqn.params),
                    act_shape=tuple(act.shape),
                    weight_shape=tuple(vals[w].shape),
                    out_shape=tuple(out.shape),
                    dtype=out.dtype,
                    bind=lambda *ops, _eqn=eqn: _bind(_eqn, ops)[0],
                    steps=self.steps,
                )
            )
        elif idx in self.active:
            # Factors in the precision the op computes in: a float16 input to a
            # float32 matmul (preferred_element_type) is multiplied in float32.
            if jnp.issubdtype(act.dtype, jnp.floating) and (
                jnp.finfo(act.dtype).bits < jnp.finfo(out.dtype).bits
            ):
                act = act.astype(out.dtype)
            self.acts[idx] = act
            self.scales[idx] = scales[w]
            out = out + self.probes[idx].astype(out.dtype)
        return out, DATA, None

    def _scan(
        self, eqn: Any, vals: list[Any], tags: list[Tag], scales: list[Any]
    ) -> list[tuple[Any, Tag, Any]]:
        p = eqn.params
        nc, ncarry, _ = (len(group) for group in p["ft_in"].unpack())
        length = p["length"]
        body = p["jaxpr"]
        # Chain values that travel through the carry or the scanned axis are
        # sliced or updated: no rule, so their leaves use explicit Jacobians.
        for t in tags[nc:]:
            if t.chain is not None:
                self.fallback.add(t.chain[0])
        in_tags = [*tags[:nc], *(_plain(t) for t in tags[nc:])]
        in_scales = [*scales[:nc], *([None] * (len(vals) - nc))]
        data = any(t.data for t in tags)
        start, k = self.counter, self.scans
        self.scans += 1
        if self.probes is None:  # analysis: walk one step, recording uses
            step_vals = [*vals[: nc + ncarry], *(v[0] for v in vals[nc + ncarry :])]
            outer, self.steps = self.steps, self.steps * length
            _, otags, _ = self.eval(
                body.jaxpr, body.consts, step_vals, in_tags, in_scales
            )
            self.steps = outer
            self.spans[k] = (self.counter, self.scans)
            for t in otags:
                if t.chain is not None:
                    self.fallback.add(t.chain[0])
            data = data or any(t.data for t in otags)
            return [(o, DATA if data else CONST, None) for o in _bind(eqn, vals)]
        end, end_scans = self.spans[k]
        inner = [i for i in sorted(self.active) if start <= i < end]

        def per_step(v: jax.Array, steps: int) -> jax.Array:
            # [steps, ...] -> [length, steps // length, ...] (squeezed when 1)
            inner_steps = steps // length
            rest = v.shape[1:]
            return v.reshape(
                length, *((inner_steps,) if inner_steps > 1 else ()), *rest
            )

        # Steps left to this scan and those nested in it (outer scans sliced theirs).
        left = {i: self.steps_of[i] // self.steps for i in inner}
        probes = [per_step(self.probes[i], left[i]) for i in inner]

        def step(carry: list[Any], xs: tuple[list[Any], list[Any]]) -> Any:
            xs_vals, step_probes = xs
            outer_probes = self.probes
            self.probes = {**outer_probes, **dict(zip(inner, step_probes, strict=True))}
            self.counter, self.scans = start, k + 1
            args = [*vals[:nc], *carry, *xs_vals]
            outer, self.steps = self.steps, self.steps * length
            outs, _, _ = self.eval(body.jaxpr, body.consts, args, in_tags, in_scales)
            self.steps = outer
            self.probes = outer_probes
            acts = [self.acts.pop(i) for i in inner]
            scs = [self.scales.pop(i, None) for i in inner]
            scs = [None if sc is None else jnp.asarray(sc) for sc in scs]
            return list(outs[:ncarry]), (list(outs[ncarry:]), acts, scs)

        carry, (ys, acts, scs) = jax.lax.scan(
            step,
            list(vals[nc : nc + ncarry]),
            (list(vals[nc + ncarry :]), probes),
            length=length,
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        self.counter, self.scans = end, end_scans
        for i, a, sc in zip(inner, acts, scs, strict=True):
            if left[i] > length:  # nested: [length, inner steps, ...]
                a = a.reshape(left[i], *a.shape[2:])
            self.acts[i] = a
            self.scales[i] = None if sc is None else sc[0]
        kind = DATA if data else CONST
        return [(o, kind, None) for o in (*carry, *ys)]


def _is_unit_broadcast(eqn: Any) -> bool:
    """A broadcast that only inserts size-1 axes keeps every entry once."""
    if eqn.primitive.name != "broadcast_in_dim":
        return False
    (v,) = eqn.invars
    (o,) = eqn.outvars
    return math.prod(v.aval.shape) == math.prod(o.aval.shape)


def _is_pure_broadcast(eqn: Any) -> bool:
    """A broadcast that adds axes without stretching any existing one."""
    (v,) = eqn.invars
    (o,) = eqn.outvars
    dims = eqn.params["broadcast_dimensions"]
    return (
        not _is_unit_broadcast(eqn)
        and all(v.aval.shape[k] == o.aval.shape[d] for k, d in enumerate(dims))
        and list(dims) == sorted(dims)
    )


def _plain(t: Tag) -> Tag:
    return DATA if t.data else CONST


def _mul(scale: Any, factor: Any) -> Any:
    return factor if scale is None else scale * factor


def _bind(eqn: Any, vals: Sequence[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*vals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# -- public entry points ---------------------------------------------------


def _per_sample_jaxpr(
    fn: Callable[[Any, jax.Array], jax.Array],
    leaves_avals: Sequence[Any],
    treedef: Any,
    x_aval: Any,
) -> jcore.ClosedJaxpr:
    def g(leaves: list[jax.Array], x: jax.Array) -> jax.Array:
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), x)

    return jax.make_jaxpr(g)(list(leaves_avals), x_aval)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the walk found: the weight uses and the leaves needing fallback."""

    jaxpr: jcore.ClosedJaxpr
    uses: tuple[Use, ...]
    biases: tuple[Bias, ...]
    fallback: frozenset[int]
    n_leaves: int
    spans: tuple[tuple[int, tuple[int, int]], ...] = ()  # see ``_Walk.spans``
    # ``(id(eqn), use)`` of top-level uses, and each use's activation operand
    # position: what ``_heads`` reads. ``heads``: what it found, ``(use, head)``.
    use_eqns: tuple[tuple[int, int], ...] = ()
    act_pos: tuple[tuple[int, int], ...] = ()
    heads: tuple[tuple[int, int], ...] = ()


def analyse(
    fn: Callable[[Any, jax.Array], jax.Array],
    leaves: Sequence[Any],
    treedef: Any,
    x_one: Any,
) -> Analysis:
    """Find the weight uses of ``fn(params, x_one)`` (``x_one`` has batch size 1)."""
    avals = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves]
    closed = _per_sample_jaxpr(fn, avals, treedef, x_one)
    walk = _Walk()

    def abstract(leaves: list[jax.Array], x: jax.Array) -> list[Any]:
        tags = [Tag(chain=(k, ())) for k in range(len(leaves))] + [DATA]
        outs, _, _ = walk.eval(
            closed.jaxpr, closed.consts, [*leaves, x], tags, [None] * (len(leaves) + 1)
        )
        return outs

    jax.eval_shape(abstract, avals, x_one)
    return Analysis(
        closed,
        tuple(walk.uses),
        tuple(walk.biases),
        frozenset(walk.fallback),
        len(leaves),
        tuple(sorted(walk.spans.items())),
        tuple(walk.use_eqns.items()),
        tuple(walk.act_pos.items()),
    )


def run(
    analysis: Analysis,
    leaves: Sequence[jax.Array],
    x_one: jax.Array,
    probes: Sequence[jax.Array],
    active: frozenset[int],
    act_probes: dict[int, jax.Array] | None = None,
) -> tuple[jax.Array, dict[int, jax.Array], dict[int, Any]]:
    """Evaluate with probes added on the active uses (and on the activations
    of the heads in ``act_probes``, keyed by use index).

    Returns:
        ``(output, activations, scales)``; the last two are keyed by use index.
        A scale of ``None`` means 1.
    """
    walk = _Walk(
        probes=probes,
        active=active,
        spans=dict(analysis.spans),
        steps_of={u.index: u.steps for u in analysis.uses},
        act_probes=dict(act_probes or {}),
    )
    n = len(leaves)
    tags = [Tag(chain=(k, ())) for k in range(n)] + [DATA]
    outs, _, _ = walk.eval(
        analysis.jaxpr.jaxpr,
        analysis.jaxpr.consts,
        [*leaves, x_one],
        tags,
        [None] * (n + 1),
    )
    (out,) = outs
    return out, walk.acts, walk.scales


__all__ = ["Analysis", "Bias", "Use", "analyse", "run"]
