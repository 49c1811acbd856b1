"""Jacobian contraction: ``Θ = J(x1) J(x2)ᵀ``, the reference strategy."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import jax
import jax.numpy as jnp

from .._model import Model
from ._base import (
    AbstractKernelStrategy,
    Cost,
    contract_rows_work,
    cotangents,
    forward_flops,
    from_work,
    param_count,
)


def per_sample_grads(
    model: Model, params: Any, x: jax.Array, output: str
) -> list[jax.Array]:
    """Per-sample gradients of each output cotangent: one ``[n, o, p]`` per leaf."""

    def one(xi: jax.Array) -> list[jax.Array]:
        out, vjp = jax.vjp(lambda p: model.one(p, xi), params)
        cts = cotangents(output, out.shape[0], out.dtype)
        (g,) = jax.vmap(vjp)(cts)
        return [v.reshape(cts.shape[0], -1) for v in jax.tree_util.tree_leaves(g)]

    return jax.vmap(one)(x)


@final
@dataclasses.dataclass(frozen=True)
class JacobianContraction(AbstractKernelStrategy):
    """Form each sample's Jacobian ``J[n, O, P]`` explicitly, then contract.

    Time ``N O [FP] + N² O² P``, memory ``N O P``: best for few parameters.
    Factors are the Jacobians themselves (one array per parameter leaf).
    """

    name = "jacobian"

    def factors(self, model: Model, params: Any, x: jax.Array, output: str) -> Any:
        """Per-leaf Jacobians ``[n, o, p_leaf]`` (o = 1 for pntk)."""
        return per_sample_grads(model, params, x, output)

    def contract(
        self, model: Model, params: Any, f1: Any, f2: Any, output: str
    ) -> jax.Array:
        """Sum over leaves of ``J1 J2ᵀ`` in the requested output form."""
        parts = [contract_rows_work(a, b, output) for a, b in zip(f1, f2, strict=True)]
        return from_work(sum(parts[1:], parts[0]), output)

    def cost(
        self, model: Model, params: Any, x: jax.Array, n1: int, n2: int, output: str
    ) -> Cost:
        """``(n1+n2)·o·3FP + n1·n2·pairs·2P`` FLOPs; memory of both Jacobians."""
        o = _out_dim(model, params, x)
        fp = forward_flops(model, params, x[:1])
        p = param_count(params)
        rows = 1 if output == "pntk" else o
        pairs = {"full": o * o, "pntk": 1}.get(output, o)
        item = jnp.result_type(*jax.tree_util.tree_leaves(params), x).itemsize
        out_items = n1 * n2 * {"full": o * o, "diagonal": o}.get(output, 1)
        return Cost(
            flops=(n1 + n2) * rows * 3 * fp + 2.0 * n1 * n2 * pairs * p,
            bytes=float(item * ((n1 + n2) * rows * p + out_items)),
        )


def _out_dim(model: Model, params: Any, x: jax.Array) -> int:
    return int(jax.eval_shape(model, params, x[:1]).shape[1])
