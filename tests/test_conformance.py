"""Every model of both zoos passes the strategy-conformance kit; the kit catches errors.

The default run checks ``auto`` (the default call) on the rectangular full
kernel for every model of the framework zoo; ``--run-slow``
checks every strategy × every output form on both zoos. ``jacobian`` and
``auto`` may never refuse a model; ``ntvp`` and ``structured`` may refuse with a
``ModelError``.
"""

from __future__ import annotations

import dataclasses
import doctest
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import pytest

import ntkdist
import ntkdist._api
import ntkdist.testing
from ntkdist.kernels import AbstractKernelStrategy, JacobianContraction
from ntkdist.testing import (
    DEFAULT_OUTPUTS,
    DEFAULT_STRATEGIES,
    ConformanceError,
    check_strategy_conformance,
)

from .zoo import ZOO
from .zoo_real import ZOO_REAL

MODELS = {
    **{f"zoo/{name}": make for name, make in ZOO.items()},
    **{f"real/{name}": make for name, make in ZOO_REAL.items()},
}
MAY_REFUSE = ("ntvp", "structured")  # explicit strategies; jacobian and auto may not


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(ZOO_REAL))
def test_default_call(model):
    """``ntk(f, p, x1, x2)`` as a user calls it, on every framework-built and
    custom-rule model (the first zoo's default calls are in test_kernels.py; the
    symmetric form of every model is in the slow matrix)."""
    f, p, x1, x2 = ZOO_REAL[model]()
    report = check_strategy_conformance(
        f,
        p,
        x1,
        x2,
        strategies=("auto",),
        outputs=("full",),
        symmetric=False,
        integer_inputs=True,
    )
    assert len(report.checks) == 1


@pytest.fixture
def _fresh_compilation_caches():
    """The full matrix compiles thousands of programs in one process: drop them
    after each model so its memory stays bounded."""
    yield
    jax.clear_caches()


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_compilation_caches")
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_strategy_every_output(model):
    f, p, x1, x2 = MODELS[model]()
    report = check_strategy_conformance(
        f, p, x1, x2, allow_refusal=MAY_REFUSE, integer_inputs=True
    )
    done = {(c.strategy, c.output, c.symmetric) for c in report.checks}
    refused = {(r.strategy, r.output, r.symmetric) for r in report.refusals}
    every = {
        (s, o, sym)
        for s in DEFAULT_STRATEGIES
        for o in DEFAULT_OUTPUTS
        for sym in (False, True)
    }
    assert done | refused == every
    assert not done & refused


# ---------------------------------------------------------------------------
# The kit itself
# ---------------------------------------------------------------------------


def _tiny(p: Any, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w"]) @ p["v"]


@pytest.fixture(scope="module")
def tiny():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {
        "w": jax.random.normal(k[0], (3, 4), jnp.float64),
        "v": jax.random.normal(k[1], (4, 2), jnp.float64),
    }
    x1 = jax.random.normal(k[2], (5, 3), jnp.float64)
    x2 = jax.random.normal(k[3], (3, 3), jnp.float64)
    return _tiny, p, x1, x2


@dataclasses.dataclass(frozen=True)
class _Delegating(AbstractKernelStrategy):
    """The Jacobian contraction, for subclasses to spoil."""

    name: ClassVar[str] = "delegating"

    def factors(self, model, params, x, output):
        return JacobianContraction().factors(model, params, x, output)

    def contract(self, model, params, f1, f2, output):
        return JacobianContraction().contract(model, params, f1, f2, output)

    def cost(self, model, params, x, n1, n2, output):
        return JacobianContraction().cost(model, params, x, n1, n2, output)


@dataclasses.dataclass(frozen=True)
class _Scaled(_Delegating):
    """Off by a relative ``1e-6``: far above rtol 1e-8."""

    def contract(self, model, params, f1, f2, output):
        return (1 + 1e-6) * super().contract(model, params, f1, f2, output)


@dataclasses.dataclass(frozen=True)
class _Lopsided(_Delegating):
    """Correct to 1e-13, but the symmetric kernel is not exactly symmetric."""

    def tile(self, model, params, x1, x2, output):
        k = super().tile(model, params, x1, x2, output)
        if x2 is not None:
            return k
        return k.at[0, 1].add(1e-13 * jnp.max(jnp.abs(k)))


@dataclasses.dataclass(frozen=True)
class _Refusing(_Delegating):
    def factors(self, model, params, x, output):
        raise ntkdist.ModelError("this strategy cannot handle the model")


def test_passing_model_gives_a_report(tiny):
    report = check_strategy_conformance(*tiny)
    assert report.ok and not report.refusals
    assert len(report.checks) == len(DEFAULT_STRATEGIES) * len(DEFAULT_OUTPUTS) * 2
    assert report.max_error <= 1e-8
    assert all(c.exactly_symmetric for c in report.checks if c.symmetric)
    assert "strategy=structured output=pntk symmetric" in str(report)


def test_wrong_kernel_is_caught_and_named(tiny):
    with pytest.raises(ConformanceError) as info:
        check_strategy_conformance(
            *tiny, strategies=("jacobian", _Scaled()), outputs=("trace",)
        )
    message = str(info.value)
    assert "strategy=_Scaled() output=trace rectangular: max error 1e-06" in message
    assert "strategy=_Scaled() output=trace symmetric (x2=None): max error" in message
    assert "strategies jacobian and _Scaled() disagree on output=trace" in message
    assert "strategy=jacobian" not in message  # the correct one is not blamed
    assert not info.value.report.ok


def test_non_symmetric_kernel_is_caught(tiny):
    for output in DEFAULT_OUTPUTS:
        with pytest.raises(ConformanceError) as info:
            check_strategy_conformance(
                *tiny, strategies=(_Lopsided(),), outputs=(output,)
            )
        (failure,) = info.value.report.failures  # within rtol; only symmetry fails
        assert failure.startswith(
            f"strategy=_Lopsided() output={output} symmetric (x2=None): "
            "not exactly symmetric"
        )


def test_refusal_is_reported_for_explicit_strategies(tiny):
    report = check_strategy_conformance(
        *tiny, strategies=("jacobian", _Refusing()), outputs=("full",)
    )
    assert report.ok and report.refused("_Refusing()")
    assert [(r.output, r.symmetric) for r in report.refusals] == [
        ("full", False),
        ("full", True),
    ]
    assert "cannot handle the model" in report.refusals[0].message
    with pytest.raises(ConformanceError, match="refused the model"):
        check_strategy_conformance(
            *tiny, strategies=(_Refusing(),), outputs=("full",), allow_refusal=()
        )


def test_other_errors_fail_even_for_explicit_strategies(tiny, monkeypatch):
    real_ntk = ntkdist._api.ntk

    def crashing_ntvp(*args, strategy="auto", **kwargs):
        if strategy == "ntvp":
            raise TypeError("unhashable type: 'Literal'")
        return real_ntk(*args, strategy=strategy, **kwargs)

    monkeypatch.setattr(ntkdist._api, "ntk", crashing_ntvp)
    with pytest.raises(ConformanceError) as info:
        check_strategy_conformance(*tiny, strategies=("ntvp",), outputs=("full",))
    assert info.value.report.failures == (
        "strategy=ntvp output=full rectangular: raised TypeError: unhashable type: "
        "'Literal'",
        "strategy=ntvp output=full symmetric (x2=None): raised TypeError: "
        "unhashable type: 'Literal'",
    )


def test_auto_may_not_refuse_or_be_wrong(tiny, monkeypatch):
    real_ntk = ntkdist._api.ntk

    def refusing_auto(*args, strategy="auto", **kwargs):
        if strategy == "auto":
            raise ntkdist.ModelError("auto found no strategy")
        return real_ntk(*args, strategy=strategy, **kwargs)

    monkeypatch.setattr(ntkdist._api, "ntk", refusing_auto)
    with pytest.raises(ConformanceError) as info:
        check_strategy_conformance(*tiny, strategies=("jacobian", "auto"))
    assert not info.value.report.refusals
    assert len(info.value.report.failures) == 2 * len(DEFAULT_OUTPUTS)
    assert "strategy=auto output=pntk rectangular: refused the model" in str(info.value)

    def wrong_auto(*args, strategy="auto", **kwargs):
        k = real_ntk(*args, strategy=strategy, **kwargs)
        return k * 1.01 if strategy == "auto" else k

    monkeypatch.setattr(ntkdist._api, "ntk", wrong_auto)
    with pytest.raises(
        ConformanceError, match=r"strategy=auto output=full rectangular"
    ):
        check_strategy_conformance(*tiny, outputs=("full",))


def test_docstring_examples_run():
    result = doctest.testmod(ntkdist.testing, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
