"""Reference kernels and assertions for testing strategies and engines.

``reference_ntk`` is deliberately naive and independent of
``ntkdist.kernels``: it builds the whole Jacobian of the whole batch with
``jax.jacrev`` and contracts it with ``einsum``. Use it in float64.

``check_strategy_conformance`` is the suite every strategy must pass on a
model: each strategy × output form × (rectangular, symmetric) kernel from
``ntkdist.ntk`` equals the reference, strategies agree with each other, and
symmetric kernels are exactly symmetric.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._model import as_model


def reference_ntk(
    apply_fn: Any, params: Any, x1: Any, x2: Any | None = None, output: str = "full"
) -> np.ndarray:
    """Plain Jacobian contraction over whole batches: the ground truth.

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda p, x: x @ p
        >>> reference_ntk(f, jnp.eye(2), jnp.ones((3, 2)), output="trace").shape
        (3, 3)
    """
    model = as_model(apply_fn)
    x1 = jnp.asarray(x1)
    x2 = x1 if x2 is None else jnp.asarray(x2)
    full = _reference_full(model, params, x1, x2)
    return reduce_full(full, output)


@functools.partial(jax.jit, static_argnums=0)
def _reference_full(model: Any, params: Any, x1: jax.Array, x2: jax.Array) -> jax.Array:
    def flat_jac(x: jax.Array) -> jax.Array:
        jac = jax.jacrev(model)(params, x)  # leaves [n, O, *leaf]
        n, o = model(params, x).shape
        return jnp.concatenate(
            [v.reshape(n, o, -1) for v in jax.tree_util.tree_leaves(jac)], axis=-1
        )

    return jnp.einsum("iap,jbp->ijab", flat_jac(x1), flat_jac(x2))


def reduce_full(full: Any, output: str) -> np.ndarray:
    """The ``output`` form of a full kernel ``[N1, N2, O, O]``."""
    full = jnp.asarray(full)
    if output == "full":
        return np.asarray(full)
    if output == "pntk":
        return np.asarray(full.sum(axis=(2, 3)) / full.shape[2])
    diag = jnp.diagonal(full, axis1=2, axis2=3)
    return np.asarray(diag if output == "diagonal" else diag.mean(axis=-1))


def assert_kernel_close(actual: Any, desired: Any, rtol: float = 1e-8) -> None:
    """Relative agreement, scaled by the largest entry of ``desired``.

    Entry-wise rtol alone is unstable for kernels with entries near zero, so
    the tolerance is ``rtol * max|desired|`` for every entry.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    scale = float(np.max(np.abs(desired))) or 1.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale)


# ---------------------------------------------------------------------------
# Strategy conformance: one suite every strategy must pass.
# ---------------------------------------------------------------------------

DEFAULT_STRATEGIES: tuple[str, ...] = ("jacobian", "ntvp", "structured", "auto")
DEFAULT_OUTPUTS: tuple[str, ...] = ("full", "trace", "diagonal", "pntk")


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """One kernel that a strategy computed, and how far it is from the reference.

    ``error`` is ``max|K - K_ref| / max|K_ref|`` (the measure of
    :func:`assert_kernel_close`). ``exactly_symmetric`` is ``None`` for
    rectangular kernels.
    """

    strategy: str
    output: str
    symmetric: bool
    error: float
    exactly_symmetric: bool | None

    @property
    def case(self) -> str:
        """``"<strategy> output=<output> <symmetric|rectangular>"``."""
        return _case(self.strategy, self.output, self.symmetric)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A strategy declined the model with a :class:`ntkdist.ModelError`."""

    strategy: str
    output: str
    symmetric: bool
    message: str

    @property
    def case(self) -> str:
        """``"<strategy> output=<output> <symmetric|rectangular>"``."""
        return _case(self.strategy, self.output, self.symmetric)


@dataclasses.dataclass(frozen=True)
class ConformanceReport:
    """Everything :func:`check_strategy_conformance` computed.

    Attributes:
        checks: one entry per kernel computed (strategy × output × form).
        refusals: one entry per accepted refusal (explicit, non-auto strategies).
        failures: what did not conform; empty when the check passed.
        rtol: the tolerance used.
    """

    checks: tuple[KernelCheck, ...]
    refusals: tuple[Refusal, ...]
    failures: tuple[str, ...]
    rtol: float

    @property
    def ok(self) -> bool:
        """No failures."""
        return not self.failures

    @property
    def max_error(self) -> float:
        """The largest relative error of any kernel computed (0.0 if none)."""
        return max((c.error for c in self.checks), default=0.0)

    def refused(self, strategy: str) -> bool:
        """Whether ``strategy`` refused the model for any output or form."""
        return any(r.strategy == strategy for r in self.refusals)

    def __str__(self) -> str:
        """A line per kernel and per refusal, then the failures."""
        lines = [f"strategy conformance at rtol={self.rtol:g}:"]
        lines += [
            f"  {c.case}: max error {c.error:.3g}"
            + ("" if c.exactly_symmetric in (None, True) else ", NOT symmetric")
            for c in self.checks
        ]
        lines += [f"  {r.case}: refused ({r.message})" for r in self.refusals]
        lines += [f"  FAIL {f}" for f in self.failures]
        return "\n".join(lines)


class ConformanceError(AssertionError):
    """A strategy does not conform; ``report`` holds every result."""

    def __init__(self, report: ConformanceReport) -> None:
        """Name every failure in the message."""
        self.report = report
        super().__init__(
            f"{len(report.failures)} conformance failure(s) at "
            f"rtol={report.rtol:g}:\n" + "\n".join(f"  {f}" for f in report.failures)
        )


def check_strategy_conformance(
    apply_fn: Any,
    params: Any,
    x1: Any,
    x2: Any,
    *,
    strategies: Sequence[Any] = DEFAULT_STRATEGIES,
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    symmetric: bool = True,
    rectangular: bool = True,
    rtol: float = 1e-8,
    allow_refusal: Collection[str] | None = None,
    **ntk_kwargs: Any,
) -> ConformanceReport:
    """Check that every strategy computes the kernel of ``apply_fn`` correctly.

    For every strategy × output × form (rectangular ``ntk(f, p, x1, x2)`` and
    symmetric ``ntk(f, p, x1)``), the kernel from :func:`ntkdist.ntk` must

    - have the reference's shape and dtype, and be finite;
    - equal :func:`reference_ntk` within ``rtol * max|reference|``;
    - agree with every other strategy's kernel within the same tolerance;
    - when symmetric, be exactly (bitwise) symmetric: ``K == Kᵀ`` for trace
      and pntk, ``Θ[i, j, a] == Θ[j, i, a]`` for diagonal and
      ``Θ[i, j, a, b] == Θ[j, i, b, a]`` for full.

    A strategy requested by name (other than ``"auto"``) or as an
    :class:`~ntkdist.kernels.AbstractKernelStrategy` instance may refuse the
    model by raising :class:`ntkdist.ModelError`; the refusal is recorded in
    the report (``allow_refusal`` narrows who may refuse). ``"auto"`` must
    never refuse, and any other exception fails. All failures are collected,
    then raised together.

    Run it in float64 (``jax.config.update("jax_enable_x64", True)`` and
    float64 params and inputs): the default ``rtol`` assumes it.

    Args:
        apply_fn: ``apply_fn(params, x) -> [n, O]`` (or a :class:`ntkdist.Model`).
        params: a pytree of floating-point arrays.
        x1: inputs ``[N1, ...]``.
        x2: inputs ``[N2, ...]`` for the rectangular kernel, or ``None`` to
            check the symmetric kernel only.
        strategies: names (``"jacobian"``, ``"ntvp"``, ``"structured"``,
            ``"auto"``) or strategy instances.
        outputs: output forms to check.
        symmetric: check ``ntk(f, p, x1)`` (``x2=None``).
        rectangular: check ``ntk(f, p, x1, x2)``.
        rtol: tolerance relative to the largest entry of the reference.
        allow_refusal: labels of the strategies that may refuse (a name, or
            ``repr`` of an instance); ``None``: every one but ``"auto"``.
        **ntk_kwargs: passed to every :func:`ntkdist.ntk` call, e.g.
            ``integer_inputs=True`` for models that take token ids.

    Returns:
        A :class:`ConformanceReport` (``str(report)`` is a readable table).

    Raises:
        ConformanceError: (an ``AssertionError``) something did not conform;
            its message names the strategy, output, form and max error of
            each failure, and ``.report`` holds everything.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jax.config.update("jax_enable_x64", True)
        >>> f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
        >>> p = {"w": jnp.full((3, 4), 0.5), "v": jnp.linspace(-1, 1, 8).reshape(4, 2)}
        >>> x1 = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)
        >>> x2 = x1[:3] + 0.5
        >>> report = check_strategy_conformance(f, p, x1, x2, outputs=["pntk"])
        >>> report.ok, len(report.checks), report.max_error < 1e-8
        (True, 8, True)
    """
    from ._api import ntk
    from ._errors import ModelError

    x1 = jnp.asarray(x1)
    x2 = None if x2 is None else jnp.asarray(x2)
    forms: list[bool] = []
    if rectangular and x2 is not None:
        forms.append(False)
    if symmetric:
        forms.append(True)
    if not forms:
        raise ValueError("nothing to check: pass x2, or keep symmetric=True")
    names = [_strategy_label(s) for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies must be distinct, got {names}")
    may_refuse = (
        {n for n in names if n != "auto"}
        if allow_refusal is None
        else set(allow_refusal) - {"auto"}
    )

    full = _reference_forms(apply_fn, params, x1, x2, forms)
    checks: list[KernelCheck] = []
    refusals: list[Refusal] = []
    failures: list[str] = []
    for sym in forms:
        for output in outputs:
            ref = reduce_full(full[sym], output)
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            scale = scale if scale > 0 and np.isfinite(scale) else 1.0
            kernels: dict[str, np.ndarray] = {}
            for strategy, name in zip(strategies, names, strict=True):
                case = _case(name, output, sym)
                try:
                    k = ntk(
                        apply_fn,
                        params,
                        x1,
                        None if sym else x2,
                        output=output,
                        strategy=strategy,
                        **ntk_kwargs,
                    )
                except ModelError as e:
                    if name in may_refuse:
                        refusals.append(Refusal(name, output, sym, _one_line(e)))
                    else:
                        failures.append(
                            f"{case}: refused the model (ModelError): {_one_line(e)}"
                        )
                    continue
                except Exception as e:
                    failures.append(
                        f"{case}: raised {type(e).__name__}: {_one_line(e)}"
                    )
                    continue
                k = np.asarray(k)
                if k.shape != ref.shape:
                    failures.append(f"{case}: shape {k.shape}, reference {ref.shape}")
                    continue
                error = float(np.max(np.abs(k - ref))) / scale if k.size else 0.0
                if not np.isfinite(error):
                    error = float("inf")
                exact = _exactly_symmetric(k, output) if sym else None
                checks.append(KernelCheck(name, output, sym, error, exact))
                kernels[name] = k
                if k.dtype != ref.dtype:
                    failures.append(f"{case}: dtype {k.dtype}, reference {ref.dtype}")
                if not error <= rtol:
                    failures.append(
                        f"{case}: max error {error:.3g} relative to max|reference| "
                        f"{scale:.3g} exceeds rtol {rtol:g}"
                    )
                if exact is False:
                    asym = float(np.max(np.abs(k - _transposed(k, output))))
                    failures.append(
                        f"{case}: not exactly symmetric (max |K - Kᵀ| {asym:.3g})"
                    )
            failures += _disagreements(kernels, output, sym, scale, rtol)
    report = ConformanceReport(tuple(checks), tuple(refusals), tuple(failures), rtol)
    if failures:
        raise ConformanceError(report)
    return report


def _reference_forms(
    apply_fn: Any, params: Any, x1: jax.Array, x2: jax.Array | None, forms: list[bool]
) -> dict[bool, np.ndarray]:
    """The full reference kernels, rectangular (``False``) and symmetric (``True``).

    Both come from one Jacobian of ``x1`` and ``x2`` stacked (one compilation).
    """
    if x2 is None or x2.shape[1:] != x1.shape[1:] or x2.dtype != x1.dtype:
        return {
            sym: reference_ntk(apply_fn, params, x1, None if sym else x2)
            for sym in forms
        }
    n1 = x1.shape[0]
    both = reference_ntk(apply_fn, params, jnp.concatenate([x1, x2]))
    return {sym: both[:n1, :n1] if sym else both[:n1, n1:] for sym in forms}


def _case(strategy: str, output: str, symmetric: bool) -> str:
    form = "symmetric (x2=None)" if symmetric else "rectangular"
    return f"strategy={strategy} output={output} {form}"


def _strategy_label(strategy: Any) -> str:
    return strategy if isinstance(strategy, str) else repr(strategy)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _transposed(k: np.ndarray, output: str) -> np.ndarray:
    if output == "full":
        return k.transpose(1, 0, 3, 2)
    if output == "diagonal":
        return k.transpose(1, 0, 2)
    return k.T


def _exactly_symmetric(k: np.ndarray, output: str) -> bool:
    return k.shape[0] == k.shape[1] and bool(np.array_equal(k, _transposed(k, output)))


def _disagreements(
    kernels: dict[str, np.ndarray],
    output: str,
    symmetric: bool,
    scale: float,
    rtol: float,
) -> list[str]:
    found = []
    names = list(kernels)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = float(np.max(np.abs(kernels[a] - kernels[b]))) / scale
            if not diff <= rtol:
                form = "symmetric (x2=None)" if symmetric else "rectangular"
                found.append(
                    f"strategies {a} and {b} disagree on output={output} {form}: "
                    f"max difference {diff:.3g} relative to max|reference|"
                )
    return found
