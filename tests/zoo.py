"""A zoo of small models that exercise every rule of the structured strategy.

Each entry builds ``(apply_fn, params, x1, x2)`` in float64 with odd sizes
(N1 = 7, N2 = 5). Functions are module-level so jitted code caches per model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Case = tuple[Callable[[Any, jax.Array], jax.Array], Any, jax.Array, jax.Array]


def _normal(key: jax.Array, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(key, shape, dtype=jnp.float64)


def _keys(seed: int, n: int) -> list[jax.Array]:
    return list(jax.random.split(jax.random.PRNGKey(seed), n))


def mlp_relu(p: Any, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def mlp_erf_ntk_param(p: Any, x: jax.Array) -> jax.Array:
    """NTK parameterisation, with the scale applied to the weight (a chain)."""
    h = jax.scipy.special.erf(x @ (p[0] / jnp.sqrt(x.shape[-1])))
    h = jnp.tanh(h @ (p[1] * (1.0 / jnp.sqrt(h.shape[-1]))))
    return h @ p[2].T  # weight used transposed


def cnn(p: Any, x: jax.Array) -> jax.Array:
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn)
    h = jax.nn.relu(h + p["cb1"])
    h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    h = lax.conv_general_dilated(h, p["c2"], (2, 2), "VALID", dimension_numbers=dn)
    h = jnp.tanh(h)
    h = h.reshape(h.shape[0], -1)
    return h @ p["dense"]


def cnn_nchw_grouped(p: Any, x: jax.Array) -> jax.Array:
    """NCHW/OIHW layout, dilation, and a grouped (depthwise-style) convolution."""
    h = lax.conv_general_dilated(
        x,
        p["c1"],
        (1, 1),
        ((1, 1), (1, 1)),
        rhs_dilation=(2, 1),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    h = jnp.tanh(h)
    h = lax.conv_general_dilated(
        h,
        p["dw"],
        (1, 1),
        "SAME",
        feature_group_count=4,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return jnp.mean(jax.nn.relu(h), axis=(2, 3)) @ p["head"]


def _layer_norm(h: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.var(h, axis=-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-5) * g + b


def resnet_ln(p: Any, x: jax.Array) -> jax.Array:
    h = x @ p["inp"]
    for blk in p["blocks"]:
        r = _layer_norm(h, blk["g"], blk["b"])
        r = jax.nn.gelu(r @ blk["w1"]) @ blk["w2"]
        h = h + r
    return h @ p["out"]


def attention(p: Any, x: jax.Array) -> jax.Array:
    """Single-head self-attention over each sample's sequence ``[T, D]``."""
    q = jnp.einsum("ntd,de->nte", x, p["wq"])
    k = jnp.einsum("ntd,de->nte", x, p["wk"])
    v = jnp.einsum("ntd,de->nte", x, p["wv"])
    a = jax.nn.softmax(jnp.einsum("nte,nse->nts", q, k) / jnp.sqrt(q.shape[-1]), -1)
    h = jnp.einsum("nts,nse->nte", a, v)
    h = _layer_norm(h + x @ p["skip"], p["g"], p["b"])
    return jnp.mean(h, axis=1) @ p["out"]


def multihead(p: Any, x: jax.Array) -> jax.Array:
    """Heads as a dot_general batch dimension shared by weight and activation."""
    q = jnp.einsum("ntd,hde->nhte", x, p["wq"])
    k = jnp.einsum("ntd,hde->nhte", x, p["wk"])
    s = jax.nn.softmax(jnp.einsum("nhte,nhse->nhts", q, k), -1)
    o = jnp.einsum("nhts,nsd->nhtd", s, x)
    z = jnp.einsum("nhtd,hdf->nhtf", o, p["wo"])
    return z.mean(axis=(1, 2))


def shared_weight(p: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w"])
    h = jnp.tanh(h @ p["w"])  # the same square weight, used twice
    return h @ p["out"]


def scalar_out(p: Any, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w"]) @ p["v"]  # shape [n]


def nested(p: Any, x: jax.Array) -> jax.Array:
    h = jnp.sin(x @ p["layers"][0]["w"] + p["layers"][0]["b"])
    h = jnp.cos(h @ p["layers"][1][0]) * p["layers"][1][1]
    return h @ p["head"]["w"]


def scanned(p: Any, x: jax.Array) -> jax.Array:
    """An RNN: the recurrent weight is used at every step of a lax.scan."""

    def step(h: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["b"])
        return h, h

    xs = jnp.swapaxes(x, 0, 1)  # [T, n, D]
    h0 = jnp.zeros((x.shape[0], p["wh"].shape[0]), x.dtype)
    h, hs = lax.scan(step, h0, xs)
    return h @ p["out"] + hs.mean(axis=0) @ p["out"]


def checkpointed(p: Any, x: jax.Array) -> jax.Array:
    @jax.checkpoint
    def block(h: jax.Array) -> jax.Array:
        return jax.nn.relu(h @ p["w1"]) @ p["w2"]

    h = jax.jit(block)(x)
    return jnp.tanh(h) @ p["w3"]


def embedding(p: Any, x: jax.Array) -> jax.Array:
    """A lookup table consumed by gather: a leaf with no rule (explicit rows)."""
    e = p["emb"][x.astype(jnp.int32)]  # [n, T, D]
    return jnp.tanh(e.mean(axis=1) @ p["w"])


def seq_dense(p: Any, x: jax.Array) -> jax.Array:
    """A dense layer over each position of a sequence: the bias is broadcast on T."""
    h = jax.nn.relu(x @ p["w"] + p["b"])  # [n, T, F]
    return jnp.mean(h, axis=1) @ p["out"] + p["out_b"]


def _seq_dense_case() -> Case:
    k = _keys(13, 6)
    p = {
        "w": _normal(k[0], (4, 6), 0.5),
        "b": _normal(k[1], (6,), 0.2),
        "out": _normal(k[2], (6, 2)),
        "out_b": _normal(k[3], (2,), 0.1),
    }
    return seq_dense, p, _normal(k[4], (7, 3, 4)), _normal(k[5], (5, 3, 4))


def _mlp_relu_case() -> Case:
    k = _keys(0, 8)
    p = {
        "w1": _normal(k[0], (6, 16), 0.5),
        "b1": _normal(k[1], (16,), 0.1),
        "w2": _normal(k[2], (16, 12), 0.3),
        "b2": _normal(k[3], (12,), 0.1),
        "w3": _normal(k[4], (12, 3), 0.3),
        "b3": _normal(k[5], (3,), 0.1),
    }
    return mlp_relu, p, _normal(k[6], (7, 6)), _normal(k[7], (5, 6))


def _mlp_erf_case() -> Case:
    k = _keys(1, 5)
    p = [_normal(k[0], (5, 9)), _normal(k[1], (9, 8)), _normal(k[2], (4, 8))]
    return mlp_erf_ntk_param, p, _normal(k[3], (7, 5)), _normal(k[4], (5, 5))


def _cnn_case() -> Case:
    k = _keys(2, 6)
    p = {
        "c1": _normal(k[0], (3, 3, 2, 4), 0.3),
        "cb1": _normal(k[1], (4,), 0.1),
        "c2": _normal(k[2], (2, 2, 4, 5), 0.3),
        "dense": _normal(k[3], (20, 3), 0.3),
    }
    return cnn, p, _normal(k[4], (7, 8, 8, 2)), _normal(k[5], (5, 8, 8, 2))


def _cnn_grouped_case() -> Case:
    k = _keys(3, 5)
    p = {
        "c1": _normal(k[0], (4, 3, 2, 3), 0.3),
        "dw": _normal(k[1], (8, 1, 3, 3), 0.3),
        "head": _normal(k[2], (8, 2), 0.3),
    }
    return cnn_nchw_grouped, p, _normal(k[3], (7, 3, 6, 5)), _normal(k[4], (5, 3, 6, 5))


def _resnet_case() -> Case:
    k = _keys(4, 12)
    blocks = [
        {
            "g": 1 + _normal(k[2 * i], (8,), 0.1),
            "b": _normal(k[2 * i + 1], (8,), 0.1),
            "w1": _normal(k[6 + i], (8, 12), 0.3),
            "w2": _normal(k[8 + i], (12, 8), 0.3),
        }
        for i in range(2)
    ]
    p = {
        "inp": _normal(k[4], (5, 8), 0.4),
        "blocks": blocks,
        "out": _normal(k[5], (8, 3)),
    }
    return resnet_ln, p, _normal(k[10], (7, 5)), _normal(k[11], (5, 5))


def _attention_case() -> Case:
    k = _keys(5, 9)
    d = 6
    p = {
        "wq": _normal(k[0], (d, 4), 0.4),
        "wk": _normal(k[1], (d, 4), 0.4),
        "wv": _normal(k[2], (d, d), 0.4),
        "skip": _normal(k[3], (d, d), 0.4),
        "g": 1 + _normal(k[4], (d,), 0.1),
        "b": _normal(k[5], (d,), 0.1),
        "out": _normal(k[6], (d, 3), 0.4),
    }
    return attention, p, _normal(k[7], (7, 4, d)), _normal(k[8], (5, 4, d))


def _multihead_case() -> Case:
    k = _keys(6, 5)
    p = {
        "wq": _normal(k[0], (2, 5, 3), 0.4),
        "wk": _normal(k[1], (2, 5, 3), 0.4),
        "wo": _normal(k[2], (2, 5, 3), 0.4),
    }
    return multihead, p, _normal(k[3], (7, 3, 5)), _normal(k[4], (5, 3, 5))


def _shared_case() -> Case:
    k = _keys(7, 4)
    p = {"w": _normal(k[0], (6, 6), 0.5), "out": _normal(k[1], (6, 2))}
    return shared_weight, p, _normal(k[2], (7, 6)), _normal(k[3], (5, 6))


def _scalar_case() -> Case:
    k = _keys(8, 4)
    p = {"w": _normal(k[0], (4, 10), 0.5), "v": _normal(k[1], (10,))}
    return scalar_out, p, _normal(k[2], (7, 4)), _normal(k[3], (5, 4))


def _nested_case() -> Case:
    k = _keys(9, 7)
    p = {
        "layers": [
            {"w": _normal(k[0], (3, 7)), "b": _normal(k[1], (7,))},
            (_normal(k[2], (7, 5)), _normal(k[3], (5,))),
        ],
        "head": {"w": _normal(k[4], (5, 2))},
    }
    return nested, p, _normal(k[5], (7, 3)), _normal(k[6], (5, 3))


def _scan_case() -> Case:
    k = _keys(10, 6)
    p = {
        "wh": _normal(k[0], (6, 6), 0.4),
        "wx": _normal(k[1], (3, 6), 0.5),
        "b": _normal(k[2], (6,), 0.1),
        "out": _normal(k[3], (6, 2)),
    }
    return scanned, p, _normal(k[4], (7, 4, 3)), _normal(k[5], (5, 4, 3))


def _checkpoint_case() -> Case:
    k = _keys(11, 5)
    p = {
        "w1": _normal(k[0], (4, 9), 0.5),
        "w2": _normal(k[1], (9, 6), 0.4),
        "w3": _normal(k[2], (6, 2)),
    }
    return checkpointed, p, _normal(k[3], (7, 4)), _normal(k[4], (5, 4))


def _embedding_case() -> Case:
    k = _keys(12, 4)
    p = {"emb": _normal(k[0], (11, 4)), "w": _normal(k[1], (4, 3))}
    x1 = jax.random.randint(k[2], (7, 5), 0, 11).astype(jnp.float64)
    x2 = jax.random.randint(k[3], (5, 5), 0, 11).astype(jnp.float64)
    return embedding, p, x1, x2


ZOO: dict[str, Callable[[], Case]] = {
    "mlp_relu": _mlp_relu_case,
    "mlp_erf_ntk_param": _mlp_erf_case,
    "cnn": _cnn_case,
    "cnn_nchw_grouped": _cnn_grouped_case,
    "resnet_layernorm": _resnet_case,
    "attention": _attention_case,
    "multihead": _multihead_case,
    "shared_weight": _shared_case,
    "scalar_output": _scalar_case,
    "nested_params": _nested_case,
    "scan": _scan_case,
    "checkpoint": _checkpoint_case,
    "embedding": _embedding_case,
    "seq_dense": _seq_dense_case,
}
