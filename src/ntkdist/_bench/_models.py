"""The real networks of the benchmark: a CIFAR ResNet-18 and a ViT-tiny, in plain JAX.

Both take NHWC images ``[n, 32, 32, 3]`` and return ``[n, 10]``. Parameters
come from numpy's seeded generator, so they are the same on every JAX
version and machine.

- ``resnet18_cifar(width=64)``: 3×3 stem (no max-pool), four stages of two
  basic blocks with ``width·(1, 2, 4, 8)`` channels and strides 1/2/2/2, 1×1
  projection shortcuts where the shape changes, batch norm in inference form
  (a per-channel scale and shift, both parameters), global average pool and
  a dense head. ``width=64`` is the usual 11.2 M-parameter network.
- ``vit_tiny()``: 4×4 patches (64 tokens), width 192, 3 heads, MLP 768, four
  pre-LayerNorm blocks (learnable gains and biases), GELU, mean pool, dense
  head: 1.8 M parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> Any:
    return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32)


def _conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=_DN
    )


# -- ResNet-18 ------------------------------------------------------------------


def _init_conv_bn(rng: np.random.Generator, k: int, c_in: int, c_out: int) -> dict:
    return {
        "w": _normal(rng, (k, k, c_in, c_out), np.sqrt(2.0 / (k * k * c_in))),
        "scale": jnp.ones(c_out, jnp.float32),
        "shift": jnp.zeros(c_out, jnp.float32),
    }


def _conv_bn(p: dict, x: jax.Array, stride: int) -> jax.Array:
    return _conv(x, p["w"], stride) * p["scale"] + p["shift"]


def init_resnet18(width: int = 64, classes: int = 10, seed: int = 0) -> dict:
    """Parameters of :func:`resnet18_apply` (``width`` channels in the first stage)."""
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {"stem": _init_conv_bn(rng, 3, 3, width)}
    c_in = width
    for s, mult in enumerate((1, 2, 4, 8)):
        c = width * mult
        for b in range(2):
            block = {
                "a": _init_conv_bn(rng, 3, c_in, c),
                "b": _init_conv_bn(rng, 3, c, c),
            }
            if c_in != c:
                block["proj"] = _init_conv_bn(rng, 1, c_in, c)
            params[f"s{s}b{b}"] = block
            c_in = c
    params["head"] = {
        "w": _normal(rng, (c_in, classes), 1.0 / np.sqrt(c_in)),
        "b": jnp.zeros(classes, jnp.float32),
    }
    return params


def resnet18_apply(params: dict, x: jax.Array) -> jax.Array:
    """CIFAR ResNet-18 forward pass: ``[n, 32, 32, 3] -> [n, classes]``."""
    h = jax.nn.relu(_conv_bn(params["stem"], x, 1))
    for s in range(4):
        for b in range(2):
            block = params[f"s{s}b{b}"]
            stride = 2 if s > 0 and b == 0 else 1
            y = jax.nn.relu(_conv_bn(block["a"], h, stride))
            y = _conv_bn(block["b"], y, 1)
            short = _conv_bn(block["proj"], h, stride) if "proj" in block else h
            h = jax.nn.relu(y + short)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["head"]["w"] + params["head"]["b"]


# -- ViT-tiny -------------------------------------------------------------------


def init_vit_tiny(
    dim: int = 192,
    depth: int = 4,
    mlp: int = 768,
    patch: int = 4,
    image: int = 32,
    classes: int = 10,
    seed: int = 0,
) -> dict:
    """Parameters of :func:`vit_apply`."""
    rng = np.random.default_rng(seed)
    tokens = (image // patch) ** 2
    d_patch = patch * patch * 3

    def dense(a: int, b: int) -> dict:
        return {"w": _normal(rng, (a, b), 1.0 / np.sqrt(a)), "b": jnp.zeros(b)}

    def norm() -> dict:
        return {"g": jnp.ones(dim, jnp.float32), "b": jnp.zeros(dim, jnp.float32)}

    return {
        "embed": dense(d_patch, dim),
        "pos": _normal(rng, (tokens, dim), 0.02),
        "blocks": [
            {
                "ln1": norm(),
                "qkv": dense(dim, 3 * dim),
                "out": dense(dim, dim),
                "ln2": norm(),
                "fc1": dense(dim, mlp),
                "fc2": dense(mlp, dim),
            }
            for _ in range(depth)
        ],
        "ln": norm(),
        "head": dense(dim, classes),
    }


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * p["g"] + p["b"]


def vit_apply(params: dict, x: jax.Array, heads: int = 3, patch: int = 4) -> jax.Array:
    """ViT forward pass: ``[n, H, W, 3] -> [n, classes]``."""
    n, hgt, _, ch = x.shape
    g = hgt // patch
    t = x.reshape(n, g, patch, g, patch, ch).transpose(0, 1, 3, 2, 4, 5)
    t = t.reshape(n, g * g, patch * patch * ch)
    h = t @ params["embed"]["w"] + params["embed"]["b"] + params["pos"]
    dim = h.shape[-1]
    dh = dim // heads
    for blk in params["blocks"]:
        y = _layer_norm(blk["ln1"], h)
        qkv = (y @ blk["qkv"]["w"] + blk["qkv"]["b"]).reshape(n, -1, 3, heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jax.nn.softmax(jnp.einsum("nthd,nshd->nhts", q, k) / np.sqrt(dh), -1)
        y = jnp.einsum("nhts,nshd->nthd", att, v).reshape(n, -1, dim)
        h = h + y @ blk["out"]["w"] + blk["out"]["b"]
        y = _layer_norm(blk["ln2"], h)
        y = jax.nn.gelu(y @ blk["fc1"]["w"] + blk["fc1"]["b"])
        h = h + y @ blk["fc2"]["w"] + blk["fc2"]["b"]
    h = jnp.mean(_layer_norm(params["ln"], h), axis=1)
    return h @ params["head"]["w"] + params["head"]["b"]


REAL_CASES: dict[str, Callable[[], tuple[Callable[..., Any], Any, tuple[int, ...]]]] = {
    "resnet18-cifar": lambda: (resnet18_apply, init_resnet18(64), (32, 32, 3)),
    "resnet18-cifar-w16": lambda: (resnet18_apply, init_resnet18(16), (32, 32, 3)),
    "vit-tiny": lambda: (vit_apply, init_vit_tiny(), (32, 32, 3)),
}
"""Real-network cases: name -> () -> (apply_fn, params, per-sample input shape)."""


def n_params(params: Any) -> int:
    """Number of parameters."""
    return sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(params))
