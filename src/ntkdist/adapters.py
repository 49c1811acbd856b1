"""Adapters from framework models to ntkdist's ``(apply_fn, params)``.

ntkdist differentiates ``apply_fn(params, x) -> [n, O]`` with respect to every
leaf of ``params``. Each adapter splits a framework model into the trainable
parameters (returned as ``params``) and everything else (held fixed inside
``apply_fn``: batch statistics, RNG keys, static configuration)::

    apply_fn, params = ntkdist.adapters.from_flax_linen(module, variables)
    kernel = ntkdist.ntk(apply_fn, params, x, output="trace")

The returned ``apply_fn`` is stable: adapting the same model again (the same
module/graph and the same fixed state) returns the same object, so tile
functions jitted with the model as a static argument compile once. It hashes
by identity; a bounded cache keeps the most recent adaptations alive.

The frameworks are imported inside each adapter, so ``import ntkdist`` works
without them. Models must be in inference mode: a batch-norm layer that uses
the batch's statistics couples samples, which ntkdist refuses.
"""

from __future__ import annotations

import collections
import inspect
import threading
from typing import TYPE_CHECKING, Any, final

import jax

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping

_CACHE_SIZE = 128
_cache: collections.OrderedDict[tuple[Any, ...], Callable[..., Any]] = (
    collections.OrderedDict()
)
_lock = threading.Lock()


def _token(obj: Any) -> Any:
    """A hashable stand-in: the object itself if hashable, else its identity."""
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return ("value", type(obj), obj)


def _tree_token(tree: Any) -> tuple[Any, ...]:
    """Structure plus per-leaf tokens; arrays count by identity."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple(_token(leaf) for leaf in leaves))


def _stable(key: tuple[Any, ...], make: Callable[[], Callable[..., Any]]) -> Any:
    """The cached adapter for ``key``, made on first use.

    The cached object holds every object whose identity is in ``key``, so an
    identity cannot be reused by another object while its entry exists.
    """
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
        made = make()
        _cache[key] = made
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return made


def _frozen_kwargs(kwargs: Mapping[str, Hashable] | None) -> tuple[Any, ...]:
    return tuple(sorted((kwargs or {}).items()))


@final
class LinenApply:
    """``apply_fn`` of a Flax linen module; built by :func:`from_flax_linen`."""

    def __init__(
        self,
        module: Any,
        fixed: Mapping[str, Any],
        method: Any,
        mutable: Any,
        kwargs: tuple[tuple[str, Any], ...],
    ) -> None:
        """Hold the module and its non-trainable collections."""
        self.module = module
        self.fixed = dict(fixed)
        self.method = method
        self.mutable = mutable
        self.kwargs = dict(kwargs)

    def __call__(self, params: Any, x: jax.Array) -> Any:
        """``module.apply({"params": params, **fixed}, x)``."""
        variables = {"params": params, **self.fixed}
        out = self.module.apply(
            variables, x, method=self.method, mutable=self.mutable, **self.kwargs
        )
        return out[0] if self.mutable else out


def from_flax_linen(
    module: Any,
    variables: Mapping[str, Any],
    *,
    method: Callable[..., Any] | str | None = None,
    mutable: bool | str | list[str] = False,
    apply_kwargs: Mapping[str, Hashable] | None = None,
) -> tuple[LinenApply, Any]:
    """Adapt a Flax linen module: params are ``variables["params"]``.

    Other collections (``batch_stats``, ...) are held fixed in ``apply_fn``.

    Args:
        module: a ``flax.linen.Module``.
        variables: from ``module.init``; must hold a ``"params"`` collection.
        method: passed to ``module.apply`` (a method name or unbound method).
        mutable: passed to ``module.apply``; when set, the updated collections
            it returns are discarded and only the output is kept.
        apply_kwargs: extra keyword arguments for the call, e.g.
            ``{"train": False}``; values must be hashable.

    Returns:
        ``(apply_fn, params)``.

    Raises:
        TypeError: ``module`` is not a linen module.
        ValueError: ``variables`` has no ``"params"``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> module = nn.Dense(2)
        >>> variables = module.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> apply_fn, params = from_flax_linen(module, variables)
        >>> apply_fn(params, jnp.ones((4, 3))).shape
        (4, 2)
    """
    from flax import linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(
            f"from_flax_linen expects a flax.linen.Module, got {type(module).__name__};"
            " for an nnx model use from_flax_nnx."
        )
    if "params" not in variables:
        raise ValueError(
            f"variables has collections {list(variables)} but no 'params'; pass the "
            "whole dict that module.init returned."
        )
    fixed = {k: v for k, v in variables.items() if k != "params"}
    mut = tuple(mutable) if isinstance(mutable, list) else mutable
    kwargs = _frozen_kwargs(apply_kwargs)
    key = ("linen", _token(module), _token(method), mut, kwargs, _tree_token(fixed))
    apply_fn = _stable(key, lambda: LinenApply(module, fixed, method, mutable, kwargs))
    return apply_fn, variables["params"]


@final
class NnxApply:
    """``apply_fn`` of a Flax NNX model; built by :func:`from_flax_nnx`."""

    def __init__(self, graphdef: Any, rest: Any) -> None:
        """Hold the graph definition and the non-parameter state."""
        self.graphdef = graphdef
        self.rest = rest

    def __call__(self, params: Any, x: jax.Array) -> Any:
        """``nnx.merge(graphdef, params, rest)(x)``."""
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.rest)(x)


def from_flax_nnx(model: Any) -> tuple[NnxApply, Any]:
    """Adapt a Flax NNX model: params are its ``nnx.Param`` state.

    The model is split with ``nnx.split(model, nnx.Param, ...)``; the rest of
    its state (batch statistics, RNG counters) is held fixed. Call
    ``model.eval()`` first if it has batch-norm or dropout layers.

    Args:
        model: an ``flax.nnx.Module``.

    Returns:
        ``(apply_fn, params)`` with params an ``nnx.State`` (a pytree).

    Raises:
        TypeError: ``model`` is not an NNX module.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> apply_fn, params = from_flax_nnx(model)
        >>> apply_fn(params, jnp.ones((4, 3))).shape
        (4, 2)
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"from_flax_nnx expects a flax.nnx.Module, got {type(model).__name__}; "
            "for a linen module use from_flax_linen."
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = ("nnx", graphdef, _tree_token(rest))
    return _stable(key, lambda: NnxApply(graphdef, rest)), params


@final
class EquinoxApply:
    """``apply_fn`` of an Equinox model; built by :func:`from_equinox`."""

    def __init__(self, static: Any) -> None:
        """Hold the non-array part of the model."""
        self.static = static

    def __call__(self, params: Any, x: jax.Array) -> Any:
        """The per-sample model, vmapped over the batch axis of ``x``."""
        import equinox as eqx

        model = eqx.combine(params, self.static)
        return jax.vmap(model)(x)


def from_equinox(model: Any) -> tuple[EquinoxApply, Any]:
    """Adapt an Equinox model that maps one sample to its outputs.

    ``eqx.partition(model, eqx.is_inexact_array)`` gives params (every
    floating-point array) and the static rest; ``apply_fn`` vmaps the model
    over the batch. Use ``eqx.nn.inference_mode(model)`` first if it has
    dropout or batch-norm layers, and move arrays that must not be
    differentiated out of the model (or wrap them in ``jax.lax.stop_gradient``
    inside it: they still count as params, with zero Jacobian).

    Args:
        model: a callable ``eqx.Module``, ``model(x_i) -> [O]``.

    Returns:
        ``(apply_fn, params)``.

    Raises:
        TypeError: ``model`` is not an Equinox module.

    Example:
        >>> import jax, jax.numpy as jnp, equinox as eqx
        >>> model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
        >>> apply_fn, params = from_equinox(model)
        >>> apply_fn(params, jnp.ones((4, 3))).shape
        (4, 2)
    """
    import equinox as eqx

    if not isinstance(model, eqx.Module):
        raise TypeError(
            f"from_equinox expects an equinox.Module, got {type(model).__name__}."
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    key = ("equinox", _tree_token(static))
    return _stable(key, lambda: EquinoxApply(static)), params


@final
class HaikuApply:
    """``apply_fn`` of a Haiku transform; built by :func:`from_haiku`."""

    def __init__(
        self,
        transformed: Any,
        state: Any,
        rngs: tuple[Any, ...],
        kwargs: tuple[tuple[str, Any], ...],
    ) -> None:
        """Hold the transform, its fixed state and RNG key (``rngs=()``: none)."""
        self.transformed = transformed
        self.leading = (() if state is None else (state,)) + rngs
        self.with_state = state is not None
        self.kwargs = dict(kwargs)

    def __call__(self, params: Any, x: jax.Array) -> Any:
        """``transformed.apply(params, [state,] [rng,] x)``, output only."""
        out = self.transformed.apply(params, *self.leading, x, **self.kwargs)
        return out[0] if self.with_state else out


def from_haiku(
    transformed: Any,
    params: Any,
    *,
    state: Any = None,
    rng: Any = None,
    apply_kwargs: Mapping[str, Hashable] | None = None,
) -> tuple[HaikuApply, Any]:
    """Adapt a Haiku ``hk.transform`` / ``hk.transform_with_state`` result.

    Args:
        transformed: ``hk.Transformed`` (then ``state`` must be ``None``) or
            ``hk.TransformedWithState`` (then ``state`` is required and held
            fixed; the updated state that ``apply`` returns is discarded).
        params: from ``transformed.init``.
        state: the state from ``init``, for ``transform_with_state``.
        rng: a fixed PRNG key for models that draw random numbers, or ``None``
            (also for transforms wrapped in ``hk.without_apply_rng``).
        apply_kwargs: extra keyword arguments for ``apply``, e.g.
            ``{"is_training": False}``; values must be hashable.

    Returns:
        ``(apply_fn, params)``.

    Raises:
        TypeError: ``transformed`` is neither kind, or ``state`` does not match it.

    Example:
        >>> import jax, jax.numpy as jnp, haiku as hk
        >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x)))
        >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> apply_fn, params = from_haiku(net, params)
        >>> apply_fn(params, jnp.ones((4, 3))).shape
        (4, 2)
    """
    import haiku as hk

    with_state = isinstance(transformed, hk.TransformedWithState)
    if not with_state and not isinstance(transformed, hk.Transformed):
        raise TypeError(
            "from_haiku expects the result of hk.transform or "
            f"hk.transform_with_state, got {type(transformed).__name__}."
        )
    if with_state and state is None:
        raise TypeError(
            "transformed comes from hk.transform_with_state, so pass state= (the "
            "second value that transformed.init returned)."
        )
    if not with_state and state is not None:
        raise TypeError(
            "state= was given, but transformed comes from hk.transform, which has "
            "no state; use hk.transform_with_state or drop state=."
        )
    takes_rng = "rng" in inspect.signature(transformed.apply).parameters
    if rng is not None and not takes_rng:
        raise TypeError(
            "rng= was given, but transformed went through hk.without_apply_rng, so "
            "its apply takes no key; drop rng= or the without_apply_rng wrapper."
        )
    rngs = (rng,) if takes_rng else ()
    kwargs = _frozen_kwargs(apply_kwargs)
    key = ("haiku", _token(transformed), _tree_token(state), _tree_token(rngs), kwargs)
    apply_fn = _stable(key, lambda: HaikuApply(transformed, state, rngs, kwargs))
    return apply_fn, params


def from_stax(apply_fn: Callable[..., Any], params: Any) -> tuple[Any, Any]:
    """Check and pass through a stax model (neural-tangents or jax's).

    ``stax`` layers already have ntkdist's signature ``apply_fn(params, x)``,
    so the same objects come back; the check catches passing the whole
    ``(init_fn, apply_fn[, kernel_fn])`` tuple instead of ``apply_fn``.

    Args:
        apply_fn: the second value of ``stax.serial(...)``.
        params: the second value of ``init_fn(key, input_shape)``.

    Returns:
        ``(apply_fn, params)`` unchanged.

    Raises:
        TypeError: ``apply_fn`` is not callable, or ``params`` has no arrays.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.example_libraries import stax
        >>> init_fn, apply_fn = stax.serial(stax.Dense(4), stax.Tanh, stax.Dense(2))
        >>> _, params = init_fn(jax.random.key(0), (-1, 3))
        >>> apply_fn, params = from_stax(apply_fn, params)
        >>> apply_fn(params, jnp.ones((5, 3))).shape
        (5, 2)
    """
    if isinstance(apply_fn, tuple):
        raise TypeError(
            "from_stax got a tuple; pass the apply_fn element of "
            "stax.serial(...) = (init_fn, apply_fn[, kernel_fn]), not the tuple."
        )
    if not callable(apply_fn):
        raise TypeError(
            f"from_stax expects a callable apply_fn, got {type(apply_fn).__name__}."
        )
    if not jax.tree_util.tree_leaves(params):
        raise TypeError(
            "params has no array leaves; pass the params that init_fn(key, "
            "input_shape) returned (its second value), not the output shape."
        )
    return apply_fn, params
