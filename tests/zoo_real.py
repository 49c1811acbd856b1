"""Models built the way people build them: framework APIs and custom derivative rules.

Each entry of ``ZOO_REAL`` builds ``(apply_fn, params, x1, x2)`` in float64 with
N1 in 5..7 and N2 in 3..5, like ``tests/zoo.py``. Framework models go through
``ntkdist.adapters`` exactly as the README's framework section shows. Models
that take token ids have integer inputs: call ``ntk(..., integer_inputs=True)``.

The frameworks are imported inside each builder, so importing this module
needs only jax.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkdist import adapters

Case = tuple[Callable[[Any, jax.Array], jax.Array], Any, jax.Array, jax.Array]

F64 = jnp.float64


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> Any:
    """Gaussian float64 values from numpy: no XLA compilation per shape."""
    return jnp.asarray(scale * rng.standard_normal(shape), F64)


def _fill(shapes: Any, seed: int, fan_in_axes: slice = slice(None, -1)) -> Any:
    """Float64 values for a tree of shapes (from ``jax.eval_shape``).

    Weights (2+ axes) are Gaussian with variance 1/fan-in, the fan-in being the
    product of ``shape[fan_in_axes]``; vectors are Gaussian around 1 when named
    like a scale and around 0 otherwise, so no leaf keeps a trivial ones/zeros
    value. Filling from numpy instead of running each framework's initialisers
    keeps building the zoo free of XLA compilations.
    """
    rng = _rng(seed)

    def value(path: Any, leaf: Any) -> Any:
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            return _randn(rng, shape, float(np.prod(shape[fan_in_axes])) ** -0.5)
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        return ("scale" in name) + _randn(rng, shape, 0.2)

    return jax.tree_util.tree_map_with_path(value, shapes)


def _inputs(seed: int, n1: int, n2: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
    rng = _rng(seed)
    return _randn(rng, (n1, *shape)), _randn(rng, (n2, *shape))


# ---------------------------------------------------------------------------
# Flax linen
# ---------------------------------------------------------------------------


def _linen(module: Any, x1: jax.Array, seed: int) -> Any:
    """``from_flax_linen`` on float64 variables (running averages included)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x1[:1])
    variables = {"params": _fill(shapes["params"], seed)}
    if "batch_stats" in shapes:
        variables["batch_stats"] = _running_averages(shapes["batch_stats"], seed)
    return adapters.from_flax_linen(module, variables)


def _running_averages(stats: Any, seed: int) -> Any:
    """Non-trivial running means, and running variances in [0.5, 1.5]."""
    rng = _rng(seed + 200)

    def moved(path: Any, leaf: Any) -> Any:
        if getattr(path[-1], "key", None) == "var":
            return jnp.asarray(0.5 + rng.uniform(size=jnp.shape(leaf)), F64)
        return _randn(rng, jnp.shape(leaf), 0.3)

    return jax.tree_util.tree_map_with_path(moved, stats)


def _linen_strided_cnn() -> Case:
    import flax.linen as nn

    class StridedCnn(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x)
            h = nn.relu(h)
            h = nn.Conv(5, (3, 3), strides=(2, 1), padding="SAME")(h)
            h = jnp.tanh(h)
            return nn.Dense(3)(h.reshape(h.shape[0], -1))

    x1, x2 = _inputs(20, 7, 5, (7, 6, 2))
    f, p = _linen(StridedCnn(), x1, 20)
    return f, p, x1, x2


def _linen_batchnorm() -> Case:
    import flax.linen as nn

    class BnNet(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Conv(4, (3, 3), padding="SAME")(x)
            h = nn.BatchNorm(use_running_average=True)(h)
            h = nn.relu(h).mean(axis=(1, 2))
            h = nn.Dense(6)(h)
            h = nn.BatchNorm(use_running_average=True)(h)
            return nn.Dense(2)(jnp.tanh(h))

    x1, x2 = _inputs(21, 6, 4, (5, 5, 2))
    f, p = _linen(BnNet(), x1, 21)
    return f, p, x1, x2


def _linen_groupnorm_pool() -> Case:
    import flax.linen as nn

    class GnPool(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Conv(4, (3, 3), padding="SAME")(x)
            h = nn.GroupNorm(num_groups=2)(h)
            h = nn.gelu(h)
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
            h = nn.Conv(6, (2, 2), padding="VALID")(h)
            h = nn.avg_pool(h, (2, 2), strides=(1, 1), padding="SAME")
            h = nn.GroupNorm(num_groups=3)(h)
            return nn.Dense(3)(h.reshape(h.shape[0], -1))

    x1, x2 = _inputs(22, 7, 5, (6, 6, 2))
    f, p = _linen(GnPool(), x1, 22)
    return f, p, x1, x2


def _linen_causal_attention() -> Case:
    import flax.linen as nn

    class CausalBlock(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]), dtype=bool)
            a = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(
                x, mask=mask
            )
            h = nn.LayerNorm()(x + a)
            return nn.Dense(2)(h)  # [n, T, 2]: every position is an output

    x1, x2 = _inputs(23, 6, 4, (4, 5))
    f, p = _linen(CausalBlock(), x1, 23)
    return f, p, x1, x2


def _linen_embed_tied() -> Case:
    import flax.linen as nn

    vocab, width = 9, 5

    class TiedLm(nn.Module):
        @nn.compact
        def __call__(self, tokens: jax.Array) -> jax.Array:
            embed = nn.Embed(vocab, width)
            h = embed(tokens)  # [n, T, D]
            h = h + nn.Dense(width)(jnp.tanh(h))
            h = nn.RMSNorm()(h)
            return embed.attend(h)  # [n, T, V] logits, weights tied to the input

    r = _rng(24)
    x1 = jnp.asarray(r.integers(0, vocab, (6, 3)))
    x2 = jnp.asarray(r.integers(0, vocab, (4, 3)))
    f, p = _linen(TiedLm(), x1, 24)
    return f, p, x1, x2


def _linen_birnn() -> Case:
    import flax.linen as nn

    class BiRnn(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Bidirectional(
                nn.RNN(nn.LSTMCell(3, param_dtype=F64)),
                nn.RNN(nn.GRUCell(3, param_dtype=F64)),
            )(x)
            return nn.Dense(2)(h[:, -1] + h.mean(axis=1))

    x1, x2 = _inputs(25, 5, 3, (5, 2))
    f, p = _linen(BiRnn(), x1, 25)
    return f, p, x1, x2


def _linen_conv_variants() -> Case:
    import flax.linen as nn

    class ConvVariants(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Conv(4, (3, 3), kernel_dilation=(2, 2), padding="SAME")(x)
            h = jnp.tanh(h)
            h = nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME")(h)  # grouped
            h = nn.relu(h)
            h = nn.Conv(8, (3, 3), feature_group_count=4, padding="VALID")(
                h
            )  # depthwise
            return nn.Dense(2)(h.mean(axis=(1, 2)))

    x1, x2 = _inputs(26, 6, 4, (6, 6, 2))
    f, p = _linen(ConvVariants(), x1, 26)
    return f, p, x1, x2


# ---------------------------------------------------------------------------
# Flax NNX, Equinox, Haiku
# ---------------------------------------------------------------------------


def _nnx_cnn() -> Case:
    from flax import nnx

    class NnxCnn(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(
                2, 3, (3, 3), strides=(2, 2), param_dtype=F64, rngs=rngs
            )
            self.norm = nnx.LayerNorm(3, param_dtype=F64, rngs=rngs)
            self.hidden = nnx.Linear(27, 6, param_dtype=F64, rngs=rngs)
            self.out = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = nnx.relu(self.norm(self.conv(x)))
            h = jnp.tanh(self.hidden(h.reshape(h.shape[0], -1)))
            return self.out(h)

    abstract = nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    graphdef, shapes, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, _fill(shapes, 27), rest)
    f, p = adapters.from_flax_nnx(model)
    x1, x2 = _inputs(27, 7, 5, (6, 6, 2))
    return f, p, x1, x2


def _fill_equinox(abstract: Any, seed: int) -> Any:
    """An Equinox model from ``eqx.filter_eval_shape``, with float64 arrays.

    Equinox weights are ``[out, in, *kernel]``: the fan-in is every axis but
    the first.
    """
    import equinox as eqx

    def is_shape(leaf: Any) -> bool:
        return isinstance(leaf, jax.ShapeDtypeStruct)

    shapes, static = eqx.partition(abstract, is_shape, is_leaf=is_shape)
    return eqx.combine(_fill(shapes, seed, slice(1, None)), static)


def _equinox_mlp() -> Case:
    import equinox as eqx

    mlp = eqx.filter_eval_shape(
        eqx.nn.MLP, 4, 3, 8, 2, activation=jax.nn.softplus, key=jax.random.PRNGKey(0)
    )
    f, p = adapters.from_equinox(_fill_equinox(mlp, 28))
    x1, x2 = _inputs(28, 7, 5, (4,))
    return f, p, x1, x2


def _equinox_conv1d() -> Case:
    import equinox as eqx

    class Conv1dNet(eqx.Module):
        conv1: eqx.nn.Conv1d
        conv2: eqx.nn.Conv1d
        head: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            k1, k2, k3 = jax.random.split(key, 3)
            self.conv1 = eqx.nn.Conv1d(2, 4, 3, stride=2, padding=1, key=k1)
            self.conv2 = eqx.nn.Conv1d(4, 4, 3, dilation=2, groups=2, key=k2)
            self.head = eqx.nn.Linear(4, 2, key=k3)

        def __call__(self, x: jax.Array) -> jax.Array:  # one sample [C, L]
            h = jnp.tanh(self.conv1(x))
            h = jax.nn.relu(self.conv2(h))
            return self.head(h.mean(axis=-1))

    model = eqx.filter_eval_shape(Conv1dNet, jax.random.PRNGKey(0))
    f, p = adapters.from_equinox(_fill_equinox(model, 29))
    x1, x2 = _inputs(29, 6, 4, (2, 11))
    return f, p, x1, x2


def _haiku_net(x: jax.Array) -> jax.Array:
    import haiku as hk

    h = hk.Conv2D(4, kernel_shape=3, stride=2, padding="SAME")(x)
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(h)
    h = jax.nn.silu(h).reshape(h.shape[0], -1)
    h = jnp.tanh(hk.Linear(6)(h))
    return hk.Linear(3)(h)


def _haiku_cnn() -> Case:
    import haiku as hk

    net = hk.without_apply_rng(hk.transform(_haiku_net))
    x1, x2 = _inputs(30, 7, 5, (5, 5, 2))
    params = _fill(jax.eval_shape(net.init, jax.random.PRNGKey(0), x1[:1]), 30)
    f, p = adapters.from_haiku(net, params)
    return f, p, x1, x2


# ---------------------------------------------------------------------------
# Plain JAX: custom derivative rules
# ---------------------------------------------------------------------------


@jax.custom_vjp
def ste_round(w: jax.Array) -> jax.Array:
    """Round to the nearest integer; the gradient passes straight through."""
    return jnp.round(w)


def _ste_fwd(w: jax.Array) -> tuple[jax.Array, None]:
    return jnp.round(w), None


def _ste_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


ste_round.defvjp(_ste_fwd, _ste_bwd)


def straight_through(p: Any, x: jax.Array) -> jax.Array:
    """A weight quantised to a grid of 1/4 with a straight-through estimator."""
    w = ste_round(4.0 * p["w"]) / 4.0
    h = jnp.tanh(x @ w + p["b"])
    return h @ p["out"]


def _straight_through_case() -> Case:
    r = _rng(31)
    p = {
        "w": _randn(r, (4, 6), 0.6),
        "b": _randn(r, (6,), 0.1),
        "out": _randn(r, (6, 2), 0.5),
    }
    x1, x2 = _inputs(131, 7, 5, (4,))
    return straight_through, p, x1, x2


def _fixed_point_map(
    w: jax.Array, u: jax.Array, b: jax.Array, x: jax.Array, z: jax.Array
) -> jax.Array:
    return jnp.tanh(z @ w + x @ u + b)


def _solve_fixed_point(w: jax.Array, u: jax.Array, b: jax.Array, x: jax.Array) -> Any:
    """Iterate ``z = tanh(z W + x U + b)`` to convergence with a while_loop."""

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        _, delta, i = state
        return (delta > 1e-15) & (i < 400)

    def body(state: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        z, _, i = state
        new = _fixed_point_map(w, u, b, x, z)
        return new, jnp.max(jnp.abs(new - z)), i + 1

    z0 = jnp.zeros((x.shape[0], w.shape[0]), x.dtype)
    z, _, _ = lax.while_loop(cond, body, (z0, jnp.asarray(jnp.inf, x.dtype), 0))
    return z


@jax.custom_vjp
def fixed_point_vjp(w: jax.Array, u: jax.Array, b: jax.Array, x: jax.Array) -> Any:
    """A DEQ layer: the fixed point, differentiated by the implicit function theorem."""
    return _solve_fixed_point(w, u, b, x)


def _fixed_point_fwd(w: jax.Array, u: jax.Array, b: jax.Array, x: jax.Array) -> Any:
    z = _solve_fixed_point(w, u, b, x)
    return z, (w, u, b, x, z)


def _fixed_point_bwd(res: Any, g: jax.Array) -> Any:
    w, u, b, x, z = res
    _, vjp_z = jax.vjp(lambda zz: _fixed_point_map(w, u, b, x, zz), z)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        _, delta, i = state
        return (delta > 1e-15) & (i < 400)

    def body(state: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        v, _, i = state  # v = g + (∂f/∂z)ᵀ v
        new = g + vjp_z(v)[0]
        return new, jnp.max(jnp.abs(new - v)), i + 1

    v, _, _ = lax.while_loop(cond, body, (g, jnp.asarray(jnp.inf, g.dtype), 0))
    _, vjp_params = jax.vjp(lambda *a: _fixed_point_map(*a, z), w, u, b, x)
    return vjp_params(v)


fixed_point_vjp.defvjp(_fixed_point_fwd, _fixed_point_bwd)


@jax.custom_jvp
def fixed_point_jvp(w: jax.Array, u: jax.Array, b: jax.Array, x: jax.Array) -> Any:
    """The same fixed point, with a forward-mode implicit rule (a linear solve)."""
    return _solve_fixed_point(w, u, b, x)


@fixed_point_jvp.defjvp
def _fixed_point_jvp_rule(primals: Any, tangents: Any) -> Any:
    w, u, b, x = primals
    z = _solve_fixed_point(w, u, b, x)
    _, df = jax.jvp(lambda *a: _fixed_point_map(*a, z), primals, tangents)
    # dz = df + (dz W) ⊙ s with s = 1 - z², i.e. dz (I - W diag(s)) = df.
    s = 1.0 - z**2
    a = jnp.eye(w.shape[0], dtype=w.dtype) - w[None] * s[:, None, :]  # [n, H, H]
    dz = jnp.linalg.solve(jnp.swapaxes(a, 1, 2), df[..., None])[..., 0]
    return z, dz


def implicit_vjp(p: Any, x: jax.Array) -> jax.Array:
    z = fixed_point_vjp(p["w"], p["u"], p["b"], x)
    return z @ p["out"]


def implicit_jvp(p: Any, x: jax.Array) -> jax.Array:
    z = fixed_point_jvp(p["w"], p["u"], p["b"], x)
    return z @ p["out"]


def _implicit_params(seed: int) -> Any:
    r = _rng(seed)
    return {
        "w": _randn(r, (5, 5), 0.15),  # a contraction: the iteration converges
        "u": _randn(r, (3, 5), 0.6),
        "b": _randn(r, (5,), 0.1),
        "out": _randn(r, (5, 2), 0.7),
    }


def _implicit_vjp_case() -> Case:
    x1, x2 = _inputs(132, 6, 4, (3,))
    return implicit_vjp, _implicit_params(32), x1, x2


def _implicit_jvp_case() -> Case:
    x1, x2 = _inputs(133, 6, 4, (3,))
    return implicit_jvp, _implicit_params(33), x1, x2


@jax.custom_jvp
def surrogate_step(h: jax.Array) -> jax.Array:
    """A hard clip whose derivative is replaced by a smooth surrogate, sech²."""
    return jnp.clip(h, -1.0, 1.0)


@surrogate_step.defjvp
def _surrogate_step_jvp(primals: Any, tangents: Any) -> Any:
    (h,), (dh,) = primals, tangents
    return surrogate_step(h), dh / jnp.cosh(h) ** 2


@jax.custom_jvp
def surrogate_clip(h: jax.Array, slope: jax.Array) -> jax.Array:
    """``clip(slope * h)`` with a learnable slope and a sech² surrogate derivative."""
    return jnp.clip(slope * h, -1.0, 1.0)


@surrogate_clip.defjvp
def _surrogate_clip_jvp(primals: Any, tangents: Any) -> Any:
    (h, slope), (dh, dslope) = primals, tangents
    grad = 1.0 / jnp.cosh(slope * h) ** 2
    return surrogate_clip(h, slope), grad * (slope * dh + h * dslope)


def custom_jvp_activation(p: Any, x: jax.Array) -> jax.Array:
    h = surrogate_step(x @ p["w1"] + p["b1"])
    h = surrogate_clip(h @ p["w2"], p["slope"])  # a parameter enters the rule
    return h @ p["w3"]


def _custom_jvp_activation_case() -> Case:
    r = _rng(34)
    p = {
        "w1": _randn(r, (4, 7), 0.8),
        "b1": _randn(r, (7,), 0.2),
        "w2": _randn(r, (7, 6), 0.6),
        "slope": 1.0 + _randn(r, (6,), 0.3),
        "w3": _randn(r, (6, 3), 0.5),
    }
    x1, x2 = _inputs(134, 7, 5, (4,))
    return custom_jvp_activation, p, x1, x2


# ---------------------------------------------------------------------------
# Plain JAX: literals, transformations and indexing inside the model
# ---------------------------------------------------------------------------


def _rms_norm(h: jax.Array, gain: jax.Array) -> jax.Array:
    """Gemma-style RMS norm: the gain is stored around zero and used as 1 + gain."""
    h = h * lax.rsqrt(jnp.mean(h**2, axis=-1, keepdims=True) + 1e-6)
    return h * (1.0 + gain)


def literal_gain(p: Any, x: jax.Array) -> jax.Array:
    h = _rms_norm(x @ p["w"], p["gain"])
    return jnp.tanh(h) @ p["out"]


def _literal_gain_case(gain_shape: tuple[int, ...], seed: int) -> Case:
    r = _rng(seed)
    p = {
        "w": _randn(r, (4, 6), 0.6),
        "gain": _randn(r, gain_shape, 0.3),
        "out": _randn(r, (6, 2), 0.5),
    }
    x1, x2 = _inputs(seed + 100, 7, 5, (4,))
    return literal_gain, p, x1, x2


def vmap_inside(p: Any, x: jax.Array) -> jax.Array:
    """A per-sample function mapped over the batch inside the model."""

    def one(xi: jax.Array) -> jax.Array:  # xi: [T, D]
        h = jnp.tanh(xi @ p["w"] + p["b"])
        return jnp.max(h, axis=0) @ p["out"]

    return jax.vmap(one)(x)


def _vmap_inside_case() -> Case:
    r = _rng(37)
    p = {
        "w": _randn(r, (3, 5), 0.7),
        "b": _randn(r, (5,), 0.1),
        "out": _randn(r, (5, 2), 0.5),
    }
    x1, x2 = _inputs(137, 6, 4, (4, 3))
    return vmap_inside, p, x1, x2


def fori_loop_model(p: Any, x: jax.Array) -> jax.Array:
    """The same weight applied three times through a static-trip-count fori_loop."""
    h = x @ p["inp"]
    h = lax.fori_loop(0, 3, lambda _, h: jnp.tanh(h @ p["w"] + p["b"]), h)
    return h @ p["out"]


def _fori_loop_case() -> Case:
    r = _rng(38)
    p = {
        "inp": _randn(r, (4, 5), 0.6),
        "w": _randn(r, (5, 5), 0.5),
        "b": _randn(r, (5,), 0.1),
        "out": _randn(r, (5, 2), 0.5),
    }
    x1, x2 = _inputs(138, 7, 5, (4,))
    return fori_loop_model, p, x1, x2


def checkpoint_policy(p: Any, x: jax.Array) -> jax.Array:
    """Blocks rematerialised with a save-the-matmuls policy."""

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_saveable)
    def block(h: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
        return h + jnp.sin(jax.nn.gelu(h @ w1) @ w2)

    h = x @ p["inp"]
    for w1, w2 in p["blocks"]:
        h = block(h, w1, w2)
    return h @ p["out"]


def _checkpoint_policy_case() -> Case:
    r = _rng(39)
    p = {
        "inp": _randn(r, (4, 5), 0.6),
        "blocks": [
            (_randn(r, (5, 7), 0.5), _randn(r, (7, 5), 0.5)),
            (_randn(r, (5, 7), 0.5), _randn(r, (7, 5), 0.5)),
        ],
        "out": _randn(r, (5, 2), 0.5),
    }
    x1, x2 = _inputs(139, 7, 5, (4,))
    return checkpoint_policy, p, x1, x2


_ROWS = (0, 2, 3, 5)


def take_and_slice(p: Any, x: jax.Array) -> jax.Array:
    """Rows of a weight by ``jnp.take``, a window of a weight by ``dynamic_slice``."""
    w = jnp.take(p["table"], jnp.asarray(_ROWS), axis=0)  # [4, 6] of [8, 6]
    start = jnp.argmax(jnp.asarray([0, 0, 1, 0]))  # a traced start index (2)
    v = lax.dynamic_slice(p["big"], (start, 0), (6, 3))  # [6, 3] of [9, 3]
    h = jnp.tanh(x @ w)
    h = jnp.take(h, jnp.asarray([5, 1, 1, 0, 3, 2]), axis=1)  # reorder, repeat
    return h @ v


def _take_slice_case() -> Case:
    r = _rng(40)
    p = {"table": _randn(r, (8, 6), 0.6), "big": _randn(r, (9, 3), 0.5)}
    x1, x2 = _inputs(140, 6, 4, (4,))
    return take_and_slice, p, x1, x2


def cumulative(p: Any, x: jax.Array) -> jax.Array:
    """Cumulative sums over a sequence and over a weight."""
    h = jnp.cumsum(x @ p["w"], axis=1)  # [n, T, F] running sum over time
    h = jnp.tanh(h + jnp.cumsum(p["b"]))
    return h.mean(axis=1) @ p["out"]


def _cumulative_case() -> Case:
    r = _rng(41)
    p = {
        "w": _randn(r, (3, 5), 0.5),
        "b": _randn(r, (5,), 0.2),
        "out": _randn(r, (5, 2), 0.5),
    }
    x1, x2 = _inputs(141, 7, 5, (6, 3))
    return cumulative, p, x1, x2


def conv_variants(p: Any, x: jax.Array) -> jax.Array:
    """Grouped, dilated (input and kernel) and depthwise convolutions, NHWC."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(
        x, p["dilated"], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn
    )
    h = jnp.tanh(h)  # [n, H, W, 4]
    h = lax.conv_general_dilated(
        h, p["grouped"], (1, 1), "SAME", feature_group_count=2, dimension_numbers=dn
    )
    h = jax.nn.relu(h)  # [n, H, W, 6]
    h = lax.conv_general_dilated(
        h,
        p["depthwise"],
        (2, 2),
        ((1, 1), (1, 1)),
        lhs_dilation=(1, 2),
        feature_group_count=6,
        dimension_numbers=dn,
    )
    return jnp.mean(jnp.tanh(h), axis=(1, 2)) @ p["head"]


def _conv_variants_case() -> Case:
    r = _rng(42)
    p = {
        "dilated": _randn(r, (3, 3, 2, 4), 0.4),
        "grouped": _randn(r, (3, 3, 2, 6), 0.4),  # 2 groups: in 4 -> out 6
        "depthwise": _randn(r, (2, 2, 1, 6), 0.4),
        "head": _randn(r, (6, 2), 0.5),
    }
    x1, x2 = _inputs(142, 6, 4, (6, 5, 2))
    return conv_variants, p, x1, x2


def conv1d(p: Any, x: jax.Array) -> jax.Array:
    """1-D convolutions over a sequence [n, L, C]: strided, then dilated grouped."""
    dn = ("NWC", "WIO", "NWC")
    h = lax.conv_general_dilated(x, p["c1"], (2,), "SAME", dimension_numbers=dn)
    h = jax.nn.relu(h + p["b1"])
    h = lax.conv_general_dilated(
        h,
        p["c2"],
        (1,),
        "VALID",
        rhs_dilation=(2,),
        feature_group_count=2,
        dimension_numbers=dn,
    )
    return jnp.tanh(h).reshape(h.shape[0], -1) @ p["head"]


def _conv1d_case() -> Case:
    r = _rng(43)
    p = {
        "c1": _randn(r, (3, 2, 4), 0.5),
        "b1": _randn(r, (4,), 0.1),
        "c2": _randn(r, (2, 2, 4), 0.5),
        "head": _randn(r, (16, 2), 0.5),  # L: 11 -> 6 -> 4 (dilation 2), C 4
    }
    x1, x2 = _inputs(143, 7, 5, (11, 2))
    return conv1d, p, x1, x2


LONG_T = 300  # past the structured walk's 256-step scan unroll


def long_scan_rnn(p: Any, x: jax.Array) -> jax.Array:
    """A tiny RNN over a long sequence with lax.scan."""

    def step(h: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["b"])
        return h, h

    h0 = jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype)
    h, hs = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return h @ p["out"] + hs.mean(axis=0) @ p["out"]


def _long_scan_case() -> Case:
    r = _rng(44)
    p = {
        "wh": _randn(r, (2, 2), 0.5),
        "wx": _randn(r, (1, 2), 0.7),
        "b": _randn(r, (2,), 0.1),
        "out": _randn(r, (2, 2), 0.7),
    }
    x1, x2 = _inputs(144, 5, 3, (LONG_T, 1))
    return long_scan_rnn, p, x1, x2


ZOO_REAL: dict[str, Callable[[], Case]] = {
    # Flax linen
    "linen_strided_cnn": _linen_strided_cnn,
    "linen_batchnorm_running": _linen_batchnorm,
    "linen_groupnorm_pool": _linen_groupnorm_pool,
    "linen_causal_attention": _linen_causal_attention,
    "linen_embed_tied": _linen_embed_tied,
    "linen_bidirectional_rnn": _linen_birnn,
    "linen_conv_variants": _linen_conv_variants,
    # Flax NNX, Equinox, Haiku
    "nnx_cnn": _nnx_cnn,
    "equinox_mlp": _equinox_mlp,
    "equinox_conv1d": _equinox_conv1d,
    "haiku_cnn": _haiku_cnn,
    # custom derivative rules
    "straight_through": _straight_through_case,
    "implicit_custom_vjp": _implicit_vjp_case,
    "implicit_custom_jvp": _implicit_jvp_case,
    "custom_jvp_activation": _custom_jvp_activation_case,
    # literals, transformations, indexing, convolutions, long scans
    "literal_gain_vector": partial(_literal_gain_case, (6,), 35),
    "literal_gain_scalar": partial(_literal_gain_case, (), 36),
    "vmap_inside": _vmap_inside_case,
    "fori_loop": _fori_loop_case,
    "checkpoint_policy": _checkpoint_policy_case,
    "take_dynamic_slice": _take_slice_case,
    "cumsum": _cumulative_case,
    "conv_grouped_dilated_depthwise": _conv_variants_case,
    "conv1d": _conv1d_case,
    "long_scan_rnn": _long_scan_case,
}
