"""Canonical layouts of one weight use, and its factors in them.

Every weight use is viewed as ``out[B, T, F] = Σ_c act[B, T, C] W[B, C, F]``
(``B``: batch axes shared by weight and activation, ``T``: the activation's free
positions, ``C``: contracted, ``F``: the weight's free axes). A use inside a
scan has ``steps`` times the positions of one step. This module lays one
sample's activation and deltas out that way, and builds a weight's per-sample
Jacobian rows from them as matrix products.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _walk


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How to view one use as ``out[B, T, F] = Σ_c act[B, T, C] W[B, C, F]``."""

    signature: tuple[Any, ...] | None  # None: no gram rule (use rows)
    b: int
    t: int
    c: int
    f: int


def _dot_axes(use: _walk.Use) -> tuple[list[int], list[int], list[int], list[int]]:
    (lc, rc), (lb, rb) = use.params["dimension_numbers"]
    wc, ac = (lc, rc) if use.weight_pos == 0 else (rc, lc)
    wb, ab = (lb, rb) if use.weight_pos == 0 else (rb, lb)
    return list(wc), list(ac), list(wb), list(ab)


def _layout(use: _walk.Use) -> _Layout:
    """The use's layout; a use at every step of a scan has ``steps`` times the
    positions of one step."""
    lay = _step_layout(use)
    return lay if use.steps == 1 else dataclasses.replace(lay, t=lay.t * use.steps)


def _one_step(use: _walk.Use) -> _walk.Use:
    return dataclasses.replace(use, steps=1)


def _canon_act_steps(use: _walk.Use, act: jax.Array) -> jax.Array:
    """``_canon_act`` of every step ``[steps, *act]`` as one ``[B, steps·T, C]``."""
    if use.steps == 1:
        return _canon_act(use, act)
    a = jax.vmap(functools.partial(_canon_act, _one_step(use)))(act)
    return a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1, a.shape[3])


def _canon_delta_steps(use: _walk.Use, delta: jax.Array) -> jax.Array:
    """``_canon_delta`` of ``[o, steps, *out]`` as one ``[o, B, steps·T, F]``."""
    if use.steps == 1:
        return _canon_delta(use, delta)
    step = functools.partial(_canon_delta, _one_step(use))
    d = jax.vmap(step, in_axes=1)(delta)  # [steps, o, B, T, F]
    return d.transpose(1, 2, 0, 3, 4).reshape(d.shape[1], d.shape[2], -1, d.shape[4])


def _weight_rows_steps(use: _walk.Use, act: jax.Array, delta: jax.Array) -> jax.Array:
    """``_weight_rows`` summed over the steps of a scan."""
    if use.steps == 1:
        return _weight_rows(use, act, delta)
    step = functools.partial(_weight_rows, _one_step(use))
    return jax.vmap(step, in_axes=(0, 1))(act, delta).sum(axis=0)


def _step_layout(use: _walk.Use) -> _Layout:
    size = lambda shape, axes: math.prod(shape[a] for a in axes)
    if use.primitive == "dot_general":
        wc, ac, wb, ab = _dot_axes(use)
        af = [d for d in range(len(use.act_shape)) if d not in ac + ab]
        wf = [d for d in range(len(use.weight_shape)) if d not in wc + wb]
        sig = ("dot", use.chain, use.weight_shape, tuple(sorted(wc)), tuple(sorted(wb)))
        return _Layout(
            sig,
            size(use.weight_shape, wb),
            size(use.act_shape, af),
            size(use.weight_shape, wc),
            size(use.weight_shape, wf),
        )
    dn = use.params["dimension_numbers"]
    rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
    t = math.prod(use.out_shape[d] for d in (out_spec[0], *out_spec[2:]))
    c = math.prod(use.weight_shape[d] for d in rhs_spec[1:])
    f = use.weight_shape[rhs_spec[0]]
    grouped = (
        use.params["feature_group_count"] != 1 or use.params["batch_group_count"] != 1
    )
    sig = None if grouped else ("conv", use.chain, use.weight_shape, tuple(rhs_spec))
    return _Layout(sig, 1, t, c, f)


def _canon_act(use: _walk.Use, act: jax.Array) -> jax.Array:
    """One sample's activation as ``[B, T, C]`` (matching the weight's ``C`` order)."""
    if use.primitive == "dot_general":
        wc, ac, wb, ab = _dot_axes(use)
        ac_s = [a for _, a in sorted(zip(wc, ac, strict=True))]
        ab_s = [a for _, a in sorted(zip(wb, ab, strict=True))]
        af = [d for d in range(act.ndim) if d not in ac + ab]
        lay = _layout(use)
        return act.transpose(*ab_s, *af, *ac_s).reshape(lay.b, lay.t, lay.c)
    patches = _conv_patches(use, act)  # [1, *out_spatial, K, C]
    return patches.reshape(1, -1, patches.shape[-2] * patches.shape[-1])


def _conv_patches(use: _walk.Use, act: jax.Array) -> jax.Array:
    """One sample's convolution patches ``[1, *out, K, C]`` by pad and strided slices.

    The output's spatial axes are in the convolution's logical order, ``K``
    runs over the filter's spatial offsets (in the weight's spatial axis
    order, row-major) and ``C`` over the input features: for channels-last
    activations (NHWC) each slice is a contiguous copy, and the patches are
    ``[T, K·C]`` without a transpose. Only copies: exact at any precision,
    and no one-hot convolution.
    """
    p = use.params
    dn = p["dimension_numbers"]
    lhs_spec = dn.lhs_spec
    x = act.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1])  # [N, *spatial, C]
    filt = [use.weight_shape[d] for d in dn.rhs_spec[2:]]
    out_sp = [use.out_shape[d] for d in dn.out_spec[2:]]
    strides = p["window_strides"]
    lhs_dil = p["lhs_dilation"] or (1,) * len(filt)
    rhs_dil = p["rhs_dilation"] or (1,) * len(filt)
    pad = p["padding"]
    zero = jnp.zeros((), x.dtype)
    cfg = (
        [(0, 0, 0)]
        + [
            (int(lo), int(hi), int(d) - 1)
            for (lo, hi), d in zip(pad, lhs_dil, strict=True)
        ]
        + [(0, 0, 0)]
    )
    x = lax.pad(x, zero, cfg)
    n, c = x.shape[0], x.shape[-1]
    slices = []
    for offs in itertools.product(*(range(k) for k in filt)):
        start = [0, *(o * d for o, d in zip(offs, rhs_dil, strict=True)), 0]
        limit = [
            n,
            *(
                st + (m - 1) * s + 1
                for st, m, s in zip(start[1:-1], out_sp, strides, strict=True)
            ),
            c,
        ]
        slices.append(lax.slice(x, start, limit, (1, *strides, 1)))
    return jnp.stack(slices, axis=-2)


def _canon_delta(use: _walk.Use, delta: jax.Array) -> jax.Array:
    """One sample's deltas ``[o, *out]`` as ``[o, B, T, F]``."""
    o = delta.shape[0]
    lay = _layout(use)
    if use.primitive == "dot_general":
        wc, ac, wb, _ = _dot_axes(use)
        nb = len(wb)
        order = sorted(range(nb), key=lambda k: wb[k])
        n_af = len(use.act_shape) - len(ac) - nb
        n_wf = len(use.weight_shape) - len(wc) - nb
        af = (
            list(range(nb, nb + n_af))
            if use.weight_pos == 1
            else list(range(nb + n_wf, nb + n_wf + n_af))
        )
        wf = (
            list(range(nb + n_af, nb + n_af + n_wf))
            if use.weight_pos == 1
            else list(range(nb, nb + n_wf))
        )
        perm = [0] + [1 + d for d in (*order, *af, *wf)]
        return delta.transpose(perm).reshape(o, lay.b, lay.t, lay.f)
    out_spec = use.params["dimension_numbers"].out_spec
    perm = [0] + [1 + d for d in (out_spec[0], *out_spec[2:], out_spec[1])]
    return delta.transpose(perm).reshape(o, 1, lay.t, lay.f)


def _rows_order(use: _walk.Use) -> tuple[int, ...]:
    """The weight axes in the order ``_weight_rows`` lays them out."""
    if use.primitive == "conv_general_dilated":
        if use.params["batch_group_count"] != 1:
            return tuple(range(len(use.weight_shape)))
        rhs = use.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        return (rhs[0], *rhs[2:], rhs[1])
    wc, _, wb, _ = _dot_axes(use)
    wf = [d for d in range(len(use.weight_shape)) if d not in wc + wb]
    return (*sorted(wb), *wf, *sorted(wc))


def _weight_rows(use: _walk.Use, act: jax.Array, delta: jax.Array) -> jax.Array:
    """One sample's gradient of the weight for each cotangent: ``[o, P]``.

    ``Σ_t act_t ⊗ δ_{o,t}`` as one matrix product (batched over samples by
    ``vmap``), with the weight's axes in ``_rows_order(use)``: a convolution's
    from its patches, a ``dot_general``'s from its canonical operands.
    """
    o = delta.shape[0]
    if use.primitive == "dot_general":
        a = _canon_act(use, act)  # [B, T, C]
        d = _canon_delta(use, delta)  # [o, B, T, F]
        return jnp.einsum("obtf,btc->obfc", d, a).reshape(o, -1)
    p = use.params
    if p["batch_group_count"] != 1:
        return _vjp_rows(use, act, delta)
    g = p["feature_group_count"]
    patches = _conv_patches(use, act)  # [1, *out, K, C]
    k, c = patches.shape[-2], patches.shape[-1]
    d = _canon_delta(use, delta)  # [o, 1, T, F]
    f = d.shape[-1]
    if g == 1:
        a = patches.reshape(-1, k * c)  # [T, K·C]
        return jnp.einsum("otf,tc->ofc", d[:, 0], a).reshape(o, -1)
    a = patches.reshape(-1, k, g, c // g)  # [T, K, G, Cg]
    d = d.reshape(o, -1, g, f // g)  # [o, T, G, Fg]
    return jnp.einsum("otgf,tkgc->ogfkc", d, a).reshape(o, -1)


def _vjp_rows(use: _walk.Use, act: jax.Array, delta: jax.Array) -> jax.Array:
    """Weight rows by a per-sample ``vjp`` of the use (the weight's own layout)."""

    def fwd(w: jax.Array) -> jax.Array:
        ops = (w, act) if use.weight_pos == 0 else (act, w)
        return use.bind(*ops)

    _, vjp = jax.vjp(fwd, jnp.zeros(use.weight_shape, delta.dtype))
    (g,) = jax.vmap(vjp)(delta)
    return g.reshape(delta.shape[0], -1)


def _to_weight_layout(
    rows: jax.Array, use: _walk.Use, order: tuple[int, ...]
) -> jax.Array:
    """Rows ``[o, P]`` laid out in ``order`` of the weight's axes, in its own order."""
    o = rows.shape[0]
    shaped = rows.reshape(o, *(use.weight_shape[d] for d in order))
    inv = [order.index(d) for d in range(len(order))]
    return shaped.transpose(0, *(1 + i for i in inv)).reshape(o, -1)


def _probe_shape(use: _walk.Use) -> tuple[int, ...]:
    return use.out_shape if use.steps == 1 else (use.steps, *use.out_shape)
