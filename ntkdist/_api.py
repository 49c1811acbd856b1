"""The in-memory entry point, ``ntk``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _inputs
from ._model import ApplyFn, Model, as_model
from ._precision import DEFAULT as DEFAULT_PRECISION, applies_precision
from ._units import parse_bytes
from .kernels import AbstractKernelStrategy, choose, get


@applies_precision
def ntk(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    memory_budget: float | str | None = None,
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> np.ndarray:
    """The empirical NTK of ``apply_fn`` between ``x1`` and ``x2``, in memory.

    With ``J(x)`` the Jacobian of the outputs with respect to all of ``params``
    and ``Θ[i, j, a, b] = <∂f_a(x1_i)/∂θ, ∂f_b(x2_j)/∂θ>``:

    - ``output="full"``: ``Θ``, shape ``(N1, N2, O, O)``.
    - ``output="trace"``: ``(1/O) Σ_a Θ[i, j, a, a]``, shape ``(N1, N2)``
      (the mean, as neural-tangents' ``trace_axes=(-1,)``).
    - ``output="diagonal"``: ``Θ[i, j, a, a]``, shape ``(N1, N2, O)``.
    - ``output="pntk"``: ``(1/O) Σ_a Σ_b Θ[i, j, a, b]``, shape ``(N1, N2)``:
      the pseudo-NTK, i.e. the NTK of ``Σ_a f_a / √O``.

    Args:
        apply_fn: ``apply_fn(params, x) -> [n, O]``; ``[n]`` means ``O = 1`` and
            trailing output axes are flattened into ``O``. Each sample's output
            must depend on that sample alone.
        params: a pytree of floating-point arrays; the kernel differentiates
            with respect to all of them.
        x1: inputs ``[N1, *features]``.
        x2: inputs ``[N2, *features]``, or ``None`` for ``x2 = x1``, in which
            case the result is exactly symmetric.
        output: ``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``.
        strategy: ``"jacobian"`` (Jacobian contraction, the reference),
            ``"ntvp"`` (NTK-vector products), ``"structured"`` (structured
            derivatives), ``"auto"`` (fewest predicted FLOPs that fit
            ``memory_budget``), or an ``AbstractKernelStrategy``.
        memory_budget: bytes ``auto`` may use (``"2GiB"`` or a number);
            ``None`` means no limit.
        check_finite: refuse NaN/inf in params or inputs (an error, not a warning).
        check_independence: refuse models whose outputs couple samples.
        integer_inputs: allow integer inputs (token or class ids).
        precision: float32 matrix-multiply precision: ``"highest"`` (true
            float32, the default), or a faster reduced one where the hardware
            has it: ``"tensorfloat32"``, ``"bfloat16"``, ``"default"`` (JAX's
            backend default: TF32 on recent NVIDIA GPUs). No effect on CPUs
            or in float64.

    Returns:
        A numpy array whose dtype follows the inputs' (float64 when jax's x64 is
        enabled and the inputs are float64).

    Raises:
        InputError: an argument is malformed (the message says what to do).
        ModelError: ``apply_fn`` does not return ``[n, O]`` per sample.
        PlanError: ``strategy="auto"`` finds nothing within ``memory_budget``.

    Example:
        >>> import jax.numpy as jnp, ntkdist
        >>> f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> p = {"w1": jnp.ones((3, 4)) / 2, "w2": jnp.ones((4, 2)) / 2}
        >>> ntkdist.ntk(f, p, jnp.ones((5, 3)), output="trace").shape
        (5, 5)
    """
    _inputs.check_output(output)
    _inputs.check_strategy(strategy)
    budget = parse_bytes(memory_budget)
    _inputs.check_params(params, check_finite=check_finite)
    x1 = _inputs.as_inputs(
        x1, "x1", integer_inputs=integer_inputs, check_finite=check_finite
    )
    if x2 is not None:
        x2 = _inputs.as_inputs(
            x2, "x2", integer_inputs=integer_inputs, check_finite=check_finite
        )
    _inputs.check_pair(x1, x2)
    model = as_model(apply_fn)
    _inputs.check_model(model, params, x1, independence=check_independence)
    x1 = jnp.asarray(x1)
    x2 = None if x2 is None else jnp.asarray(x2)
    if strategy == "auto":
        n2 = x1.shape[0] if x2 is None else x2.shape[0]
        chosen, _ = choose(model, params, x1, x1.shape[0], n2, output, budget)
    else:
        chosen = get(strategy)
    result = chosen.tile(model, params, x1, x2, output)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params), x1)
    return np.asarray(result.astype(dtype))
