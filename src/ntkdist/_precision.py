"""Matrix-multiply precision: what float32 means on GPUs and TPUs.

JAX's default lets XLA multiply float32 matrices in reduced precision where the
hardware offers it (TF32 on NVIDIA GPUs since Ampere, bfloat16 passes on
TPUs). On an H100 that made a float32 eNTK of a 3-layer MLP 1 % wrong
(relative to the largest entry), so ntkdist computes at ``"highest"``
(true float32) unless asked otherwise. On CPUs every setting computes the
same values. The setting is part of the job's fingerprint: a store is never
resumed at another precision.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

import jax

from ._errors import InputError

# The names jax.default_matmul_precision accepts, by what they compute.
PRECISIONS = (
    "highest",
    "float32",
    "high",
    "bfloat16_3x",
    "default",
    "tensorfloat32",
    "bfloat16",
)
DEFAULT = "highest"
# Reduced-precision settings: outputs of one sample computed alone or in a
# batch may differ by this much, relative to their scale.
_REDUCED = {"default", "tensorfloat32", "bfloat16"}


def check(precision: str) -> str:
    """``precision`` if jax knows it, else an ``InputError`` listing the choices."""
    if precision not in PRECISIONS:
        raise InputError(
            f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}. "
            "'highest' (the default) multiplies float32 matrices in float32; "
            "'tensorfloat32', 'bfloat16' and 'default' (the backend's own) trade "
            "accuracy for speed on GPUs and TPUs."
        )
    return precision


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Trace and run JAX code inside with ``precision`` (a validated name)."""
    with jax.default_matmul_precision(check(precision)):
        yield


def current() -> str:
    """The precision JAX traces with here and now (``"default"`` if unset)."""
    return jax.config.jax_default_matmul_precision or "default"


def independence_tolerance(dtype: str) -> float:
    """How far a sample's output alone may be from its output in a batch."""
    if dtype == "float64":
        return 1e-9
    return 3e-2 if current() in _REDUCED else 1e-4


def applies_precision[**P, R](fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` inside :func:`matmul_precision` of its ``precision`` argument.

    ``fn`` declares ``precision`` as a keyword argument with its default; the
    decorator validates it and sets it for everything ``fn`` traces or runs.
    """
    default = inspect.signature(fn).parameters["precision"].default

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matmul_precision(kwargs.get("precision", default)):
            return fn(*args, **kwargs)

    return wrapper
