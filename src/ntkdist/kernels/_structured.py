"""Structured derivatives: the NTK from activations and deltas, never from J.

For a weight used as ``y = dot(act, W)`` the per-sample gradient of output
``a`` is ``Σ_t act_t ⊗ δ_{a,t}`` (``t`` runs over the activation's free axes,
for example positions in a sequence or a convolution's output pixels). Two
ways to get that weight's share of ``Θ[i, j, a, b]``:

* **gram** (the paper's structured rule):
  ``Σ_{t,u} <act1_{i,t}, act2_{j,u}> <δ1_{i,a,t}, δ2_{j,b,u}>``,
  costing ``T²·(C + O²·F)`` per pair of samples; best when ``T`` is small.
* **rows**: form the per-sample gradient of that weight alone from the
  factors (``O·T·C·F`` per sample), then contract (``O²·C·F`` per pair);
  best for convolutions over large images.

Each weight (parameter leaf) gets the cheaper of the two for a nominal tile
size (rows that would hold more memory must be clearly cheaper). Uses of one
leaf with the same layout (weight sharing, scan steps) are concatenated along
``T``, which sums every cross term. Leaves with no rule use their explicit
Jacobian rows; only those rows are ever materialised.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, final

import jax
import jax.numpy as jnp
from jax import lax

from .._model import Model
from . import _walk
from ._base import (
    FUSED,
    AbstractKernelStrategy,
    Cost,
    contract_rows_work,
    cotangents,
    forward_flops,
    from_work,
)
from ._heads import diagonal_heads, folded_delta, head_deltas, head_for
from ._layouts import (
    _canon_act_steps,
    _canon_delta_steps,
    _dot_axes,
    _layout,
    _probe_shape,
    _rows_order,
    _to_weight_layout,
    _weight_rows_steps,
)


@functools.lru_cache(maxsize=64)
def _analysis(
    model: Model,
    treedef: Any,
    leaf_avals: tuple[Any, ...],
    x_aval: Any,
    precision: str | None,
) -> _walk.Analysis:
    # ``precision``: the traced jaxpr records the matmul precision in force,
    # so a walk is reused only at the precision it was traced with.
    avals = [jax.ShapeDtypeStruct(s, d) for s, d in leaf_avals]
    an = _walk.analyse(model, avals, treedef, jax.ShapeDtypeStruct(*x_aval))
    heads = diagonal_heads(an.jaxpr.jaxpr, dict(an.use_eqns), dict(an.act_pos))
    return dataclasses.replace(an, heads=tuple(sorted(heads.items())))


def analysis_for(model: Model, params: Any, x: jax.Array) -> _walk.Analysis:
    """The (cached) walk of ``model`` for params and inputs shaped like these."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_avals = tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in leaves)
    x_aval = ((1, *x.shape[1:]), jnp.result_type(x))
    precision = jax.config.jax_default_matmul_precision
    return _analysis(model, treedef, leaf_avals, x_aval, precision)


# -- grouping and costs -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Group:
    leaf: int
    uses: tuple[_walk.Use, ...]
    gram: bool
    bias: _walk.Bias | None = None  # a bias folded into this gram rule
    # ``trace`` only: the head whose activation's deltas fold this use's
    # ``O`` deltas into one vector per sample (see ``_heads``).
    head: int | None = None


def _bias_fits(use: _walk.Use, bias: _walk.Bias) -> bool:
    """Whether ``bias`` lies along the weight's output features ``F`` of ``use``."""
    lay = _layout(use)
    if lay.signature is None or lay.b != 1:
        return False
    if use.primitive == "dot_general":
        wc, ac, wb, _ = _dot_axes(use)
        if wb:
            return False
        n_af = len(use.act_shape) - len(ac)
        n_wf = len(use.weight_shape) - len(wc)
        first = n_af if use.weight_pos == 1 else 0
        features = set(range(first, first + n_wf))
    else:
        features = {use.params["dimension_numbers"].out_spec[1]}
    if len(bias.shape) != len(use.out_shape):
        return False
    # Varies exactly along the features (in their order), constant elsewhere.
    return all(
        bias.shape[d] == (n if d in features else 1)
        for d, n in enumerate(use.out_shape)
    )


def _pairs(output: str, o: int) -> int:
    return {"full": o * o, "pntk": 1}.get(output, o)


def _group_costs(
    uses: Sequence[_walk.Use], output: str, o: int, nominal: int, folded: bool = False
) -> tuple[float | None, float]:
    """Per-pair FLOPs of the gram rule (None if impossible) and of the rows rule
    (``folded``: the deltas fold into one vector, see ``_Group.head``)."""
    lays = [_layout(u) for u in uses]
    rows_o = 1 if output == "pntk" else o
    p = math.prod(uses[0].weight_shape)
    build = sum(2.0 * rows_o * lay.b * lay.t * lay.c * lay.f for lay in lays)
    rows = 2.0 * _pairs(output, o) * p + 2 * build / nominal
    if (
        any(lay.signature is None for lay in lays)
        or len({lay.signature for lay in lays}) != 1
    ):
        return None, rows
    b, c, f = lays[0].b, lays[0].c, lays[0].f
    t = sum(lay.t for lay in lays)
    pairs = 1 if folded else _pairs(output, o)
    if output == "full":  # contract t first (O·T²·F), then (u, f) (O²·T·F)
        gram = 2.0 * b * t * t * c + 2.0 * b * o * t * f * (t + o)
    else:
        gram = 2.0 * b * t * t * c + pairs * (2.0 * b * t * t * f + 2.0 * b * t * t)
    return gram, rows


ROWS_MARGIN = 1.25
"""How much cheaper per-weight rows must be than the gram rule where they hold
more bytes per sample than the gram rule's factors."""


def _prefer_gram(
    gram: float,
    rows: float,
    uses: Sequence[_walk.Use],
    output: str,
    o: int,
    folded: bool = False,
) -> bool:
    """The gram rule, unless rows cost fewer FLOPs; rows that would hold more
    bytes per sample (``O·P`` against ``T·(C + O·F)``) must cost
    ``ROWS_MARGIN`` times fewer, since a tile holds both sides' factors."""
    lays = [_layout(u) for u in uses]
    rows_o = 1 if output == "pntk" else o
    rows_items = rows_o * math.prod(uses[0].weight_shape)
    d_o = 1 if folded else rows_o
    gram_items = lays[0].b * sum(la.t for la in lays) * (lays[0].c + d_o * lays[0].f)
    return gram <= rows * (ROWS_MARGIN if rows_items > gram_items else 1.0)


@final
@dataclasses.dataclass(frozen=True)
class StructuredDerivatives(AbstractKernelStrategy):
    """Structured derivatives (Novak, Sohl-Dickstein & Schoenholz, ICML 2022).

    Works on any JAX function by walking its jaxpr (see ``ntkdist.kernels._walk``):
    ``dot_general`` and convolution weights get rules, weight sharing and the
    steps of a ``lax.scan`` (kept a scan) are summed over uses, calls such as
    ``jax.jit`` and ``jax.checkpoint`` are inlined, and leaves with no rule
    (biases, norm scales, weights behind a custom derivative rule or consumed in
    other ways) use explicit per-leaf Jacobians.

    Args:
        nominal_tile: the tile size for which each weight picks between the
            gram rule and per-weight Jacobian rows (the choice must not depend
            on a tile's actual size, so that ragged tiles contract with full ones).
        mode: ``"auto"`` (cheapest per weight), ``"gram"`` (gram rule wherever
            it applies) or ``"rows"`` (per-weight Jacobian rows everywhere).
    """

    name = "structured"
    nominal_tile: int = 256
    mode: str = "auto"

    def groups(
        self, model: Model, params: Any, x: jax.Array, output: str
    ) -> tuple[list[_Group], list[int]]:
        """Weight groups (with their rule) and the leaves left to fallback."""
        an = analysis_for(model, params, x)
        o = int(math.prod(an.jaxpr.out_avals[0].shape[1:]))
        by_leaf: dict[int, list[_walk.Use]] = {}
        for u in an.uses:
            if u.leaf not in an.fallback:
                by_leaf.setdefault(u.leaf, []).append(u)
        heads = dict(an.heads)
        groups = []
        for leaf, uses in sorted(by_leaf.items()):
            if len({u.chain for u in uses}) != 1:
                continue  # the same leaf reached through different chains
            # In one fused program XLA:CPU's scheduler runs the folded rule
            # slower than the plain one (MLP 256 trace: 33 vs 28 ms); the
            # separate programs the engine runs gain from it (29 vs 31 ms).
            head = None if FUSED.get() else head_for(uses, heads, output)
            fold = head is not None
            gram, rows = _group_costs(uses, output, o, self.nominal_tile, fold)
            use_gram = gram is not None and (
                self.mode == "gram"
                or (
                    self.mode == "auto"
                    and _prefer_gram(gram, rows, uses, output, o, fold)
                )
            )
            groups.append(
                _Group(leaf, tuple(uses), use_gram, head=head if use_gram else None)
            )
        groups = _fold_biases(an, groups, set(by_leaf))
        covered = {g.leaf for g in groups} | {g.bias.leaf for g in groups if g.bias}
        fallback = [k for k in range(an.n_leaves) if k not in covered]
        return groups, fallback

    def factors(self, model: Model, params: Any, x: jax.Array, output: str) -> Any:
        """Gram factors ``(act[n,B,T,C], delta[n,o,B,T,F])`` per gram weight, and
        Jacobian rows ``[n, o, P]``: one array per rows weight (never concatenated,
        which would copy the largest factors) and one for all fallback leaves."""
        an = analysis_for(model, params, x)
        groups, fb = self.groups(model, params, x, output)
        leaves = jax.tree_util.tree_leaves(params)
        active = frozenset(u.index for g in groups for u in g.uses) | {
            g.bias.index for g in groups if g.bias
        }
        uses = {u.index: u for u in an.uses}
        probes = {
            i: jnp.zeros(_probe_shape(uses[i]), uses[i].dtype)
            for i in active
            if i in uses
        }
        fb_leaves = [leaves[k] for k in fb]
        m = head_deltas(an, leaves, x, output, {g.head for g in groups}, uses)

        def one(xi: jax.Array) -> Any:
            def f(probes: Any, fb_leaves: Any) -> Any:
                lv = list(leaves)
                for k, v in zip(fb, fb_leaves, strict=True):
                    lv[k] = v
                out, acts, scales = _walk.run(an, lv, xi[None], probes, active)
                return out.reshape(-1), (acts, scales)

            out, vjp, (acts, scales) = jax.vjp(f, probes, fb_leaves, has_aux=True)
            cts = cotangents(output, out.shape[0], out.dtype)
            deltas, dfb = jax.vmap(vjp)(cts)
            return _sample_factors(groups, acts, scales, deltas, dfb, m)

        grams, rows = jax.vmap(one)(x)
        return grams, rows

    def contract(
        self, model: Model, params: Any, f1: Any, f2: Any, output: str
    ) -> jax.Array:
        """Sum of every gram weight's share and the rows' ``J1 J2ᵀ``."""
        (grams1, rows1), (grams2, rows2) = f1, f2
        parts = []
        for r1, r2 in zip(rows1, rows2, strict=True):  # one GEMM per weight:
            parts.append(contract_rows_work(r1, r2, output))  # no concatenated copy
        for (a1, d1), (a2, d2) in zip(grams1, grams2, strict=True):
            parts.append(_gram_contract(a1, d1, a2, d2, output))
        return from_work(sum(parts[1:], parts[0]), output)

    def cost(
        self, model: Model, params: Any, x: jax.Array, n1: int, n2: int, output: str
    ) -> Cost:
        """Factor passes plus contraction FLOPs; bytes of both tiles' factors."""
        an = analysis_for(model, params, x)
        groups, fb = self.groups(model, params, x, output)
        o = int(math.prod(an.jaxpr.out_avals[0].shape[1:]))
        rows_o = 1 if output == "pntk" else o
        fp = forward_flops(model, params, x[:1])
        leaves = jax.tree_util.tree_leaves(params)
        flops = (n1 + n2) * (2 * fp + rows_o * 2 * fp)
        factor_items = 0.0
        p_rows = sum(math.prod(jnp.shape(leaves[k])) for k in fb)
        for g in groups:
            fold = g.head is not None
            gram, _ = _group_costs(g.uses, output, o, self.nominal_tile, fold)
            lays = [_layout(u) for u in g.uses]
            if g.gram:
                flops += n1 * n2 * float(gram or 0.0)
                t = sum(lay.t for lay in lays)
                d_o = 1 if fold else rows_o
                factor_items += lays[0].b * t * (lays[0].c + d_o * lays[0].f)
            else:
                flops += (n1 + n2) * sum(
                    2.0 * rows_o * la.b * la.t * la.c * la.f for la in lays
                )
                p_rows += math.prod(g.uses[0].weight_shape)
        flops += 2.0 * n1 * n2 * _pairs(output, o) * p_rows
        factor_items += rows_o * p_rows
        item = jnp.result_type(*leaves, x).itemsize
        out_items = n1 * n2 * {"full": o * o, "diagonal": o}.get(output, 1)
        return Cost(
            flops=float(flops),
            bytes=float(item * ((n1 + n2) * factor_items + out_items)),
        )


def _fold_biases(
    an: _walk.Analysis, groups: list[_Group], weight_leaves: set[int]
) -> list[_Group]:
    """Fold each bias into the gram rule of the one weight use it is added to."""
    per_leaf: dict[int, list[_walk.Bias]] = {}
    for b in an.biases:
        per_leaf.setdefault(b.leaf, []).append(b)
    by_use = {
        g.uses[0].index: i for i, g in enumerate(groups) if g.gram and len(g.uses) == 1
    }
    out = list(groups)
    for leaf, found in sorted(per_leaf.items()):
        if len(found) != 1 or leaf in an.fallback or leaf in weight_leaves:
            continue
        (b,) = found
        i = by_use.get(b.partner)
        if i is None or out[i].bias is not None or not _bias_fits(out[i].uses[0], b):
            continue
        out[i] = dataclasses.replace(out[i], bias=b)
    return out


def _sample_factors(
    groups: Sequence[_Group],
    acts: dict[int, jax.Array],
    scales: dict[int, Any],
    deltas: dict[int, jax.Array],
    dfb: Sequence[jax.Array],
    m: dict[int, jax.Array],
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array]]:
    grams = []
    rows = []
    for g in groups:
        if g.gram:
            a = [
                _scale(_canon_act_steps(u, acts[u.index]), scales[u.index])
                for u in g.uses
            ]
            if g.bias is not None:  # Σ (a1·a2 + s²) <δ1, δ2>: one more column
                s = scales.get(g.bias.index)
                ones = jnp.ones((*a[0].shape[:-1], 1), a[0].dtype)
                a = [jnp.concatenate([a[0], _scale(ones, s)], axis=-1)]
            if g.head is not None:  # m: ∂f/∂h at the head (``head_deltas``)
                (u,) = g.uses
                q = folded_delta(deltas[u.index], m[g.head])
                d = [_canon_delta_steps(u, q)]
            else:
                d = [_canon_delta_steps(u, deltas[u.index]) for u in g.uses]
            grams.append((jnp.concatenate(a, axis=1), jnp.concatenate(d, axis=2)))
        else:
            r = [
                _scale(
                    _weight_rows_steps(u, acts[u.index], deltas[u.index]),
                    scales[u.index],
                )
                for u in g.uses
            ]
            orders = [_rows_order(u) for u in g.uses]
            if len(set(orders)) > 1:  # mixed layouts: each in the weight's own
                r = [
                    _to_weight_layout(v, u, k)
                    for v, u, k in zip(r, g.uses, orders, strict=True)
                ]
            rows.append(sum(r[1:], r[0]))
    o = (
        next(iter(deltas.values())).shape[0]
        if deltas
        else (dfb[0].shape[0] if dfb else 1)
    )
    if dfb:  # explicit Jacobian rows of small leaves: one array
        rows.append(jnp.concatenate([v.reshape(o, -1) for v in dfb], axis=1))
    return grams, rows


def _scale(v: jax.Array, s: Any) -> jax.Array:
    return v if s is None else v * jnp.asarray(s, v.dtype)


def _gram_contract(
    a1: jax.Array, d1: jax.Array, a2: jax.Array, d2: jax.Array, output: str
) -> jax.Array:
    """One weight's share from gram factors, in working layout (``from_work``).

    With one position (dense layers) each form is a single GEMM of the deltas
    scaled elementwise by the activations' gram; ``trace`` contracts
    ``(a, f)`` together, so it costs one GEMM with ``O·F`` inner size.
    """
    if a1.shape[1] == 1 and a1.shape[2] == 1 and a2.shape[2] == 1:
        ga = a1[:, 0, 0] @ a2[:, 0, 0].T
        e1, e2 = d1[:, :, 0, 0], d2[:, :, 0, 0]
        n1, o, _ = e1.shape
        n2 = e2.shape[0]
        if output == "full":
            g = (e1.reshape(n1 * o, -1) @ e2.reshape(n2 * o, -1).T).reshape(
                n1, o, n2, o
            )
            return ga[:, None, :, None] * g
        if output == "pntk":
            return ga * (e1[:, 0] @ e2[:, 0].T)
        if output == "trace":
            return ga * (e1.reshape(n1, -1) @ e2.reshape(n2, -1).T) / o
        return ga[None] * jnp.einsum("iaf,jaf->aij", e1, e2)
    n1 = a1.shape[0]
    k = max(1, int(_GRAM_BLOCK_BYTES // _gram_bytes_per_row(a1, d1, a2, output)))
    if k >= n1:
        return _gram_block(a1, d1, a2, d2, output)

    def one(ad: tuple[jax.Array, jax.Array]) -> jax.Array:
        r = _gram_block(ad[0][None], ad[1][None], a2, d2, output)
        return r[:, 0] if output == "diagonal" else r[0]

    # Rows of the tile in blocks of k, so the intermediates stay bounded.
    out = lax.map(one, (a1, d1), batch_size=k)
    return out.transpose(1, 0, 2) if output == "diagonal" else out


# The gram rule's intermediates grow as N1·N2·T²: contract in blocks of
# rows of the tile so that they stay under this size.
_GRAM_BLOCK_BYTES = 256 * 2**20


def _gram_bytes_per_row(a1: Any, d1: Any, a2: Any, output: str) -> float:
    """Bytes of ``_gram_block``'s intermediates per row ``i`` of the tile."""
    n2, b, t1, t2 = a2.shape[0], a2.shape[1], a1.shape[2], a2.shape[2]
    o, f = d1.shape[1], d1.shape[-1]
    ga = n2 * b * t1 * t2
    if output == "full" and _deltas_first(o, t1, t2):
        x = n2 * o * o * b * t1 * t2
    elif output == "full":  # the product and its transposed copy
        x = 2 * n2 * o * b * t2 * f
    else:
        x = n2 * b * t1 * t2 * (o if output == "diagonal" else 1)
    return float((ga + x) * jnp.dtype(d1.dtype).itemsize)


def _gram_block(
    a1: jax.Array, d1: jax.Array, a2: jax.Array, d2: jax.Array, output: str
) -> jax.Array:
    ga = jnp.einsum("ibtc,jbuc->ijbtu", a1, a2)
    if output == "full":
        if _deltas_first(d1.shape[1], a1.shape[2], a2.shape[2]):
            return _full_deltas_first(ga, d1, d2)
        return _full_positions_first(ga, d1, d2)
    if output == "pntk":
        return jnp.einsum("ijbtu,ibtf,jbuf->ij", ga, d1[:, 0], d2[:, 0])
    if output == "trace":
        return jnp.einsum("ijbtu,iabtf,jabuf->ij", ga, d1, d2) / d1.shape[1]
    return jnp.einsum("ijbtu,iabtf,jabuf->aij", ga, d1, d2)


def _deltas_first(o: int, t1: int, t2: int) -> bool:
    """Whether ``full``'s gram share contracts the deltas' features first.

    Positions first costs ``O·T·F·(T + O)`` per pair in two products whose
    inner sizes are ``T`` and ``T·F`` with a transpose of the ``N1·N2·O·T·F``
    product between them; deltas first costs ``O²·T²·F`` in one product of
    inner size ``F`` (at the GEMM rate). Measured on XLA:CPU, deltas first is
    faster while the FLOP ratio ``O·T/(T + O)`` stays under about 7 (ResNet's
    4×4 stage, ``T = 16``, ``O = 10``), positions first beyond (``T = 64``).
    """
    t = max(t1, t2)
    return o * t <= 7 * (t + o)


def _full_deltas_first(ga: jax.Array, d1: jax.Array, d2: jax.Array) -> jax.Array:
    """``Σ_{t,u} ga[i,j,t,u] Σ_f d1[i,a,t,f] d2[j,c,u,f]``: one GEMM over ``f``."""
    e = jnp.einsum("iabtf,jcbuf->iabtjcu", d1, d2)
    return jnp.einsum("ijbtu,iabtjcu->iajc", ga, e)


def _full_positions_first(ga: jax.Array, d1: jax.Array, d2: jax.Array) -> jax.Array:
    """``t`` first (``O·T²·F``), then ``(b, u, f)`` (``O²·T·F``) per pair, each
    a batched matrix product in the layout it wants."""
    n1, o, b, t1, f = d1.shape
    n2, _, _, t2, _ = d2.shape
    g = ga.transpose(0, 2, 1, 4, 3).reshape(n1 * b, n2 * t2, t1)  # [(i,b),(j,u),t]
    d = d1.transpose(0, 2, 3, 1, 4).reshape(n1 * b, t1, o * f)  # [(i,b),t,(a,f)]
    x = jnp.matmul(g, d).reshape(n1, b, n2, t2, o, f)  # [i,b,j,u,a,f]
    x = x.transpose(2, 0, 4, 1, 3, 5).reshape(n2, n1 * o, b * t2 * f)
    y = jnp.matmul(x, d2.reshape(n2, o, b * t2 * f).transpose(0, 2, 1))
    return y.reshape(n2, n1, o, o).transpose(1, 2, 0, 3)  # [i,a,j,c]
