"""Checks at the boundary: every bad argument fails here, with what to do."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError, ModelError
from ._model import Model
from ._outputs import OUTPUTS
from ._precision import independence_tolerance
from .kernels import STRATEGIES, AbstractKernelStrategy
from .storage._fingerprint import nonfinite_error


def check_output(output: str) -> str:
    """``output`` must be one of :data:`ntkdist._outputs.OUTPUTS`."""
    if output not in OUTPUTS:
        raise InputError(
            f"output={output!r} is not known; expected one of {list(OUTPUTS)} "
            "(see ntkdist.ntk's docstring for each formula)."
        )
    return output


def check_strategy(strategy: str | AbstractKernelStrategy) -> None:
    """``strategy`` must be ``"auto"``, a known name or a strategy instance."""
    if isinstance(strategy, AbstractKernelStrategy) or strategy == "auto":
        return
    if strategy not in STRATEGIES:
        raise InputError(
            f"strategy={strategy!r} is not known; expected 'auto', one of "
            f"{list(STRATEGIES)}, or an AbstractKernelStrategy instance."
        )


def check_params(params: Any, *, check_finite: bool = True) -> None:
    """Params must be a non-empty pytree of finite floating-point arrays."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise InputError(
            "params has no array leaves; expected a pytree (dict, list, tuple) of "
            "floating-point arrays holding the model's trainable parameters."
        )
    for path, leaf in flat:
        name = jax.tree_util.keystr(path) or "params"
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise InputError(
                f"params{name if name != 'params' else ''} has dtype {dtype}; the "
                "NTK differentiates with respect to every params leaf, so each must "
                "be a real floating-point array. Move integer or complex leaves "
                "(step counters, masks, RNG keys) out of params, into apply_fn's "
                "closure."
            )
        if check_finite and not _all_finite(leaf):
            raise InputError(
                f"params{name if name != 'params' else ''} holds NaN or inf; the "
                "kernel would be NaN. Check the initialisation or the checkpoint "
                "(or pass check_finite=False to compute anyway).",
                keywords=["check_finite=False"],
            )


def _is_float(dtype: np.dtype) -> bool:
    """Real floating point, bfloat16 and the other ml_dtypes floats included."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def as_inputs(
    x: Any, name: str, *, integer_inputs: bool = False, check_finite: bool = True
) -> jax.Array | np.ndarray:
    """Check one input array: ``[n, *features]`` with ``n >= 1``, real floating."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if len(x.shape) < 1:
        raise InputError(
            f"{name} has shape {tuple(x.shape)}; expected [n, *features] with a "
            "leading sample axis. Wrap a single sample as x[None]."
        )
    if x.shape[0] == 0:
        raise InputError(
            f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample."
        )
    dtype = np.dtype(x.dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise InputError(
            f"{name} has complex dtype {dtype}; ntkdist computes real NTKs only."
        )
    if not _is_float(dtype) and not (
        integer_inputs and np.issubdtype(dtype, np.integer)
    ):
        raise InputError(
            f"{name} has dtype {dtype}; expected a floating-point array. Cast it "
            f"(for example {name}.astype('float32')), or pass integer_inputs=True if "
            "the model takes integer ids (token or class indices).",
            keywords=["integer_inputs=True"],
        )
    if check_finite and _is_float(dtype):
        finite = _finite_rows(x)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise nonfinite_error(name, bad, len(bad), int(x.shape[0]))
    return x


# Finite checks: numpy for host and CPU arrays (no copy, no compilation;
# eager ``jnp`` compiled each step, 0.4 s for an MLP's params), one jitted
# reduction for arrays on an accelerator (no copy to the host).


def _on_accelerator(x: Any) -> bool:
    return isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices())


def _all_finite(x: Any) -> bool:
    if _on_accelerator(x):
        return bool(_all_finite_jit(x))
    return bool(np.isfinite(np.asarray(x)).all())


def _finite_rows(x: Any) -> np.ndarray:
    """Which samples (rows of ``x``) hold only finite values."""
    if _on_accelerator(x):
        return np.asarray(_finite_rows_jit(x))
    return np.isfinite(np.asarray(x)).reshape(x.shape[0], -1).all(axis=1)


@jax.jit
def _all_finite_jit(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


@jax.jit
def _finite_rows_jit(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)


def check_pair(x1: Any, x2: Any | None) -> None:
    """x1 and x2 must have the same per-sample feature shape."""
    if x2 is not None and tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise InputError(
            f"x1 has samples of shape {tuple(x1.shape[1:])} but x2 has "
            f"{tuple(x2.shape[1:])}; both must hold samples of the model's input "
            "shape (the leading axis is the sample axis)."
        )


def check_model(model: Model, params: Any, x: Any, *, independence: bool = True) -> int:
    """The model must map ``[n, ...]`` to ``[n, O]`` per sample; returns ``O``."""
    for n in (2, 3):  # two sizes, so an [O, n] output with O == n is caught too
        out = _output_shape(model, params, x, n)
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) < 1 or shape[0] != n:
            got = (
                f"shape {tuple(shape)}"
                if shape is not None
                else f"a {type(out).__name__}"
            )
            raise ModelError(
                f"apply_fn(params, x) returned {got} for a batch of {n} samples; "
                "expected an array [n, O] (or [n]) with the sample axis first. If "
                "the model returns a tuple or dict, wrap it: "
                "lambda p, x: model(p, x)['logits']."
            )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ModelError(
            f"apply_fn returned dtype {out.dtype}; expected floating point."
        )
    if independence and x.shape[0] >= 2:
        _check_independent(model, params, x)
    return int(np.prod(shape[1:], dtype=np.int64))


def _output_shape(model: Model, params: Any, x: Any, n: int) -> Any:
    probe = jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype)
    try:
        return jax.eval_shape(model.apply_fn, params, probe)
    except Exception as err:
        if len(x.shape) == 1:
            raise InputError(
                "x1 is 1-D, so it was read as samples with no feature axis, and "
                f"apply_fn(params, x) failed on a batch of shape {probe.shape} "
                f"({type(err).__name__}: {err}). x1 must be [n, *features]: pass "
                "x1[:, None] for n samples of one feature, or x1[None] for one "
                "sample."
            ) from err
        raise ModelError(
            f"apply_fn(params, x) failed on a batch of shape {probe.shape} "
            f"({type(err).__name__}: {err}); expected it to accept params and a "
            "batch [n, *features] and return an array [n, O] (or [n])."
        ) from err


def _batched_and_alone(model: Model, params: Any, xs: jax.Array) -> Any:
    """The model on the batch ``xs`` and on each sample alone (a batch of one).

    One jitted program (``vmap`` over batches of one sample): several times
    faster than running the model eagerly five times, even counting the
    compilation. A model that cannot be vmapped runs eagerly instead.
    """

    def both(params: Any, xs: jax.Array) -> Any:
        alone = jax.vmap(lambda xi: model(params, xi[None])[0])(xs)
        return model(params, xs), alone

    try:
        batched, alone = jax.jit(both)(params, xs)
    except Exception:
        batched = model(params, xs)
        rows = [model(params, xs[i : i + 1]) for i in range(xs.shape[0])]
        alone = jnp.concatenate(rows)
    return np.asarray(batched), np.asarray(alone)


def _check_independent(model: Model, params: Any, x: Any) -> None:
    xs = jnp.asarray(x[: min(4, x.shape[0])])
    batched, alone = _batched_and_alone(model, params, xs)
    tol = independence_tolerance(str(batched.dtype))
    # numpy from here: eager jnp would compile each small op (0.15 s)
    alone64 = alone.astype(np.float64)
    scale = float(np.max(np.abs(alone64))) + 1.0
    if float(np.max(np.abs(batched.astype(np.float64) - alone64))) > tol * scale:
        raise ModelError(
            "apply_fn's output for a sample depends on the other samples in the "
            "batch (for example batch-norm statistics computed from the batch, or "
            "attention across the batch axis). The eNTK is defined per sample, and "
            "tiling would change it: evaluate norms with fixed statistics (inference "
            "mode), or pass check_independence=False if this is intended.",
            keywords=["check_independence=False"],
        )
