"""The model as ntkdist sees it: ``apply_fn(params, x) -> [n, O]``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ApplyFn = Callable[[Any, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Model:
    """A user's ``apply_fn`` with its output flattened to ``[n, O]``.

    ``[n]`` outputs mean ``O = 1``; trailing output axes beyond the first are
    flattened into ``O``. Hashable by the identity of ``apply_fn``, so jitted
    tile functions that take it as a static argument compile once per model.
    """

    apply_fn: ApplyFn

    def __call__(self, params: Any, x: jax.Array) -> jax.Array:
        """Evaluate on a batch; returns ``[n, O]``."""
        y = jnp.asarray(self.apply_fn(params, x))
        n = x.shape[0]
        if y.ndim == 1:
            return y[:, None]
        return y.reshape(n, -1)

    def one(self, params: Any, x: jax.Array) -> jax.Array:
        """Evaluate on one sample (no batch axis); returns ``[O]``."""
        return self(params, x[None])[0]


def as_model(apply_fn: ApplyFn | Model) -> Model:
    """Wrap ``apply_fn`` unless it already is a :class:`Model`."""
    return apply_fn if isinstance(apply_fn, Model) else Model(apply_fn)
