"""The strategy interface and the four output forms.

Output forms, for ``Θ[i, j, a, b] = <∂f_a(x1_i)/∂θ, ∂f_b(x2_j)/∂θ>``:

========== ================ ==============================================
output     shape            definition
========== ================ ==============================================
full       (N1, N2, O, O)   ``Θ[i, j, a, b]``
trace      (N1, N2)         ``(1/O) Σ_a Θ[i, j, a, a]`` (neural-tangents
                            ``trace_axes=(-1,)``: it averages)
diagonal   (N1, N2, O)      ``Θ[i, j, a, a]``
pntk       (N1, N2)         ``(1/O) Σ_a Σ_b Θ[i, j, a, b]``, the NTK of
                            ``Σ_a f_a / √O`` (Mohamadi & Sutherland 2023)
========== ================ ==============================================
"""

from __future__ import annotations

import abc
import contextvars
import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._model import Model
from ._flops import jaxpr_flops

Output = Literal["full", "trace", "diagonal", "pntk"]
OUTPUTS: tuple[str, ...] = ("full", "trace", "diagonal", "pntk")


def tile_shape(output: str, n1: int, n2: int, out_dim: int) -> tuple[int, ...]:
    """Shape of a kernel (or tile) of ``output`` form."""
    return {
        "full": (n1, n2, out_dim, out_dim),
        "trace": (n1, n2),
        "diagonal": (n1, n2, out_dim),
        "pntk": (n1, n2),
    }[output]


def cotangents(output: str, out_dim: int, dtype: Any) -> jax.Array:
    """Output cotangents whose vjps give the factors needed for ``output``.

    ``pntk`` needs one: the all-``1/√O`` vector. The others need the basis.
    """
    if output == "pntk":
        return jnp.full((1, out_dim), 1.0 / jnp.sqrt(out_dim), dtype=dtype)
    return jnp.eye(out_dim, dtype=dtype)


def contract_rows(g1: jax.Array, g2: jax.Array, output: str) -> jax.Array:
    """Contract per-sample, per-cotangent gradients ``g[n, o, p]`` into a tile.

    ``o`` is ``O`` (for full/trace/diagonal) or 1 (for pntk, whose cotangent
    already carries the ``1/√O``).
    """
    return from_work(contract_rows_work(g1, g2, output), output)


def contract_rows_work(g1: jax.Array, g2: jax.Array, output: str) -> jax.Array:
    """``contract_rows`` in the *working layout* of ``output`` (see ``from_work``).

    Every form is one GEMM (or one batched GEMM) whose result needs no
    transpose: ``full`` is ``[(i, a), (j, b)]``, ``diagonal`` is batched over
    ``a`` in front. Sums over parameters are accumulated in this layout and
    transposed once at the end.
    """
    n1, n2 = g1.shape[0], g2.shape[0]
    if output == "full":
        o1, o2 = g1.shape[1], g2.shape[1]
        k = g1.reshape(n1 * o1, -1) @ g2.reshape(n2 * o2, -1).T
        return k.reshape(n1, o1, n2, o2)
    if output == "pntk":
        return g1[:, 0] @ g2[:, 0].T
    if output == "trace":  # one GEMM over (a, p) together
        return (g1.reshape(n1, -1) @ g2.reshape(n2, -1).T) / g1.shape[1]
    return jnp.einsum("iap,jap->aij", g1, g2)


def from_work(k: jax.Array, output: str) -> jax.Array:
    """A tile in working layout (``[i, a, j, b]`` for full, ``[a, i, j]`` for
    diagonal, ``[i, j]`` otherwise) as the output form's layout."""
    if output == "full":
        return k.transpose(0, 2, 1, 3)
    if output == "diagonal":
        return k.transpose(1, 2, 0)
    return k


def symmetrize(k: jax.Array, output: str) -> jax.Array:
    """Make a square tile exactly symmetric: ``Θ[i,j,a,b] = Θ[j,i,b,a]``."""
    if output == "full":
        return (k + k.transpose(1, 0, 3, 2)) / 2
    if output == "diagonal":
        return (k + k.transpose(1, 0, 2)) / 2
    return (k + k.T) / 2


@dataclasses.dataclass(frozen=True)
class Cost:
    """Predicted work for one tile: floating-point operations and peak bytes."""

    flops: float
    bytes: float


class AbstractKernelStrategy(abc.ABC):
    """How one tile of the kernel is computed.

    A strategy splits a tile into per-tile *factors* (``factors``, which depend
    on one tile's samples only) and a *contraction* of two tiles' factors
    (``contract``). Engines cache factors across tiles; ``tile`` is both steps.
    Subclasses are frozen dataclasses, hashable, so they can be static
    arguments of jitted functions.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def factors(self, model: Model, params: Any, x: jax.Array, output: str) -> Any:
        """Per-sample factors of the samples ``x``: a pytree of arrays, each
        with the samples along its first axis."""

    @abc.abstractmethod
    def contract(
        self, model: Model, params: Any, f1: Any, f2: Any, output: str
    ) -> jax.Array:
        """The kernel tile between two sets of factors."""

    @abc.abstractmethod
    def cost(
        self, model: Model, params: Any, x: jax.Array, n1: int, n2: int, output: str
    ) -> Cost:
        """Predicted work of one ``n1 × n2`` tile (``x`` gives the feature shape)."""

    def tile(
        self,
        model: Model,
        params: Any,
        x1: jax.Array,
        x2: jax.Array | None,
        output: str,
    ) -> jax.Array:
        """The kernel between ``x1`` and ``x2`` (``None``: ``x1``, symmetric).

        The symmetric case is made exactly symmetric in a separate step: inside
        one XLA program the compiler may recompute a reduction in another order
        for the transposed copy, and then ``(k + kᵀ) / 2`` is not exact.
        """
        k = _tile(self, model, output, params, x1, x2)
        return k if x2 is not None else _symmetrize(k, output)


FUSED = contextvars.ContextVar("ntkdist_fused_tile", default=False)
"""True while a strategy is traced into one program with its contraction
(``tile``), not into the separate factor and contraction programs the engine
runs; a strategy may lay its factors out differently for each."""


def _tile_impl(
    strategy: AbstractKernelStrategy,
    model: Model,
    output: str,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None,
) -> jax.Array:
    token = FUSED.set(True)
    try:
        f1 = strategy.factors(model, params, x1, output)
        if x2 is None:
            return strategy.contract(model, params, f1, f1, output)
        f2 = strategy.factors(model, params, x2, output)
        return strategy.contract(model, params, f1, f2, output)
    finally:
        FUSED.reset(token)


_tile = jax.jit(_tile_impl, static_argnums=(0, 1, 2))
_symmetrize = jax.jit(symmetrize, static_argnums=(1,))


def param_count(params: Any) -> int:
    """Number of scalar parameters in a pytree."""
    # Leaves may be shapes only (jax.ShapeDtypeStruct), which jnp.size refuses.
    return sum(
        int(np.prod(getattr(v, "shape", np.shape(v))))
        for v in jax.tree_util.tree_leaves(params)
    )


def forward_flops(model: Model, params: Any, x_one: jax.Array) -> float:
    """XLA's FLOP count of one forward pass on one sample (batch of 1), or the
    count from the model's jaxpr where XLA's misses most of it (GPUs).

    Lowering a large model takes seconds, and every strategy's cost model asks:
    the count is kept per model, shapes and dtypes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    avals = tuple((tuple(jnp.shape(v)), str(jnp.result_type(v))) for v in leaves)
    x_aval = (tuple(jnp.shape(x_one)), str(jnp.result_type(x_one)))
    precision = jax.config.jax_default_matmul_precision
    return _forward_flops(model, treedef, avals, x_aval, precision)


@functools.lru_cache(maxsize=64)
def _forward_flops(
    model: Model,
    treedef: Any,
    avals: tuple[Any, ...],
    x_aval: tuple[Any, ...],
    precision: str | None,
) -> float:
    params = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(s, d) for s, d in avals]
    )
    x_one = jax.ShapeDtypeStruct(*x_aval)
    lowered = jax.jit(model).lower(params, x_one)
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", 0.0))
    # On GPUs XLA's figure can miss the convolutions: the count from the
    # jaxpr's equations is taken where XLA reports less than half of it.
    counted = jaxpr_flops(jax.make_jaxpr(model)(params, x_one))
    if flops < 0.5 * counted:
        flops = counted
    return max(flops, 2.0 * sum(math.prod(shape) for shape, _ in avals))
