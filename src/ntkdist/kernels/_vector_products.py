"""NTK-vector products: ``Θ v = J(x1) (J(x2)ᵀ v)``, one vjp and one jvp per column.

``J(x1) u`` is a forward-mode product (``jax.jvp``) by default. Forward mode
cannot pass through a ``custom_vjp`` rule, so for models that contain one the
product is taken in reverse mode only: ``u ↦ J u`` is the transpose of the
linear map ``v ↦ Jᵀ v``, and the vjp of a vjp is that transpose. That works
wherever ``jax.vjp`` of the rule's backward pass works.
"""

from __future__ import annotations

import dataclasses
from typing import Any, final

import jax
import jax.numpy as jnp

from .._model import Model
from ._base import AbstractKernelStrategy, Cost, cotangents, forward_flops, param_count
from ._support import contains_primitive

# Columns (samples of x2) handled at once: bounds memory to this many
# parameter-sized vectors per output.
_COLUMN_BATCH = 8
# Primitives forward-mode differentiation cannot pass.
_NO_JVP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})


@final
@dataclasses.dataclass(frozen=True)
class NtkVectorProducts(AbstractKernelStrategy):
    """Never store a Jacobian: for each column, pull back then push forward.

    Time ``N² O [FP]``, memory ``N O [FP]``: best when ``O`` exceeds the width or
    for tiny tiles. Factors are the inputs themselves (nothing to reuse).
    ``trace`` and ``diagonal`` cost as much as ``full``; ``pntk`` costs ``1/O``.

    Args:
        column_batch: columns (samples of ``x2``) computed at once.
        mode: how ``J(x1) u`` is formed: ``"forward"`` (``jax.jvp``),
            ``"reverse"`` (the transpose of a vjp, no forward mode: works
            through ``custom_vjp`` rules), or ``"auto"`` (reverse where the
            model has a ``custom_vjp``, forward elsewhere).
    """

    name = "ntvp"
    column_batch: int = _COLUMN_BATCH
    # Not in the repr (the store fingerprint): every mode computes the same kernel.
    mode: str = dataclasses.field(default="auto", repr=False)

    def factors(self, model: Model, params: Any, x: jax.Array, output: str) -> Any:
        """The inputs: this strategy has no per-tile precomputation."""
        return x

    def contract(
        self, model: Model, params: Any, f1: Any, f2: Any, output: str
    ) -> jax.Array:
        """Columns of the tile by vjp at ``x2_j`` then jvp at all of ``x1``."""
        x1, x2 = f1, f2
        mode = self.mode
        if mode == "auto":
            jaxpr = jax.make_jaxpr(model)(params, x1[:1])
            mode = "reverse" if contains_primitive(jaxpr, _NO_JVP) else "forward"
        if mode == "reverse":
            # u ↦ J(x1) u as the transpose of v ↦ J(x1)ᵀ v (linear in v).
            out1, vjp1 = jax.vjp(lambda p: model(p, x1), params)
            _, transpose = jax.vjp(lambda v: vjp1(v)[0], jnp.zeros_like(out1))

            def forward(pulled: Any) -> jax.Array:
                return transpose(pulled)[0]

        else:

            def forward(pulled: Any) -> jax.Array:
                _, tangent = jax.jvp(lambda p: model(p, x1), (params,), (pulled,))
                return tangent

        def column(xj: jax.Array) -> jax.Array:
            out, vjp = jax.vjp(lambda p: model.one(p, xj), params)
            cts = cotangents(output, out.shape[0], out.dtype)

            def push(ct: jax.Array) -> jax.Array:
                (pulled,) = vjp(ct)
                return forward(pulled)  # [n1, O]

            return jax.vmap(push)(cts)  # [o_b, n1, O_a]

        cols = jax.lax.map(column, x2, batch_size=self.column_batch)  # [n2, b, n1, a]
        if output == "pntk":
            return jnp.sum(cols[:, 0], axis=-1).T / jnp.sqrt(cols.shape[-1])
        full = cols.transpose(2, 0, 3, 1)  # [n1, n2, a, b]
        if output == "full":
            return full
        diag = jnp.diagonal(full, axis1=2, axis2=3)
        return diag if output == "diagonal" else jnp.mean(diag, axis=-1)

    def cost(
        self, model: Model, params: Any, x: jax.Array, n1: int, n2: int, output: str
    ) -> Cost:
        """``n2·o·(3FP + n1·2FP)`` FLOPs; memory of a batch of pulled vectors."""
        o = int(jax.eval_shape(model, params, x[:1]).shape[1])
        rows = 1 if output == "pntk" else o
        fp = forward_flops(model, params, x[:1])
        item = jnp.result_type(*jax.tree_util.tree_leaves(params), x).itemsize
        p = param_count(params)
        return Cost(
            flops=n2 * rows * (3 * fp + n1 * 2 * fp),
            bytes=float(
                item * (self.column_batch * rows * (p + 4 * n1 * o) + n1 * n2 * o * o)
            ),
        )
