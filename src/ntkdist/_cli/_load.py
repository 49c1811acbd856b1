"""Loading what the command line names: a model factory and input arrays.

MODEL is ``path/to/file.py:factory`` or ``package.module:factory``, where
``factory(**model_args)`` returns ``(apply_fn, params)``; the arguments come
from ``--model-arg KEY=VALUE`` and are recorded in the store's model spec as a
call, ``/abs/model.py:make(width=512)``, which :func:`load_model` reads back.
Every input a subcommand reads (``--x1``, ``--labels``, ...) is a ``.npy``
file, a ``.npz`` file with a key (``data.npz:x``), or a Zarr array path, read
by :func:`load_input`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any

from .._errors import InputError, ModelError


def model_arg(text: str) -> tuple[str, Any]:
    """One ``--model-arg KEY=VALUE``: VALUE as a Python literal, else a string.

    Example:
        >>> model_arg("width=512"), model_arg("ckpt=run3.npz")
        (('width', 512), ('ckpt', 'run3.npz'))
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE with KEY a Python name; e.g. "
            "--model-arg width=512 or --model-arg ckpt=run3.npz"
        )
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, value


def split_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``("file.py:make", {"width": 512})`` from ``"file.py:make(width=512)"``.

    Raises:
        InputError: the call part is not keyword arguments with literal values.
    """
    open_at = spec.find("(")
    if open_at < 0 or not spec.endswith(")"):
        return spec, {}
    head, call = spec[:open_at], spec[open_at:]
    try:
        node = ast.parse("f" + call, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError("positional arguments")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        if None in kwargs:
            raise ValueError("**kwargs")
    except (ValueError, SyntaxError, TypeError) as err:
        raise InputError(
            f"MODEL={spec!r}: its arguments {call} are not KEY=VALUE pairs of "
            f"Python literals ({err}); e.g. models/mlp.py:make(width=512)."
        ) from err
    return head, {str(k): v for k, v in kwargs.items()}


def load_model(spec: str, model_args: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(apply_fn, params)`` from ``file.py:factory`` or ``package.module:factory``.

    The factory is called with ``model_args`` as keyword arguments, after any
    the spec itself names (``file.py:make(width=512)``, as stores record it).
    A module loaded from a file is registered for pickling by value, so
    worker processes that cannot import it still receive the model.

    Raises:
        InputError: the file, module or factory does not exist, or the
            factory takes no such keyword argument.
        ModelError: the factory fails or returns something else.
    """
    spec, named = split_model_spec(spec)
    kwargs = {**named, **(model_args or {})}
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InputError(
            f"MODEL={spec!r}; expected 'path/to/file.py:factory' or "
            "'package.module:factory' where factory() returns (apply_fn, params)."
        )
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise InputError(
                f"MODEL file {target!r} does not exist (looked at {path}); pass an "
                "existing Python file, e.g. models/mlp.py:make."
            )
        # As `python file.py` does: modules beside the file are importable.
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        before = set(sys.modules)
        mod_name = "ntkdist_model_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"MODEL file {path} cannot be loaded as Python.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            raise ModelError(
                f"running MODEL file {path} failed: {type(err).__name__}: {err}"
            ) from err
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
        # Modules it imported from beside it travel by value too, so workers
        # that cannot import them (another host, another path) still can run it.
        for name_ in sorted(set(sys.modules) - before):
            mod = sys.modules.get(name_)
            where = getattr(mod, "__file__", None) or ""
            if "." not in name_ and os.path.abspath(where).startswith(folder + os.sep):
                cloudpickle.register_pickle_by_value(mod)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise InputError(
                f"MODEL module {target!r} cannot be imported ({err}); pass an "
                "importable module or a path to a .py file."
            ) from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(
            f"MODEL {spec!r}: {target} has no callable {name!r}; expected a "
            "function factory() returning (apply_fn, params)."
        )
    _check_accepts(factory, spec, kwargs)
    try:
        result = factory(**kwargs)
    except Exception as err:
        raise ModelError(
            f"MODEL factory {spec!r} raised {type(err).__name__}: {err}"
        ) from err
    if not (
        isinstance(result, tuple | list) and len(result) == 2 and callable(result[0])
    ):
        got = type(result).__name__
        if isinstance(result, tuple | list):
            got = f"a {got} of {len(result)} items"
        raise ModelError(
            f"MODEL factory {spec!r} returned {got}; expected a pair "
            "(apply_fn, params) with apply_fn(params, x) -> [n, O]."
        )
    return result[0], result[1]


def _check_accepts(factory: Any, spec: str, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments the factory's signature does not take."""
    if not kwargs:
        return
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin): let the call say
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key in kwargs:
        if key not in takes:
            raise InputError(
                f"MODEL factory {spec!r} takes no keyword argument {key!r} (given "
                f"by --model-arg {key}=...); its signature is "
                f"{getattr(factory, '__name__', 'factory')}{sig}."
            )


def canonical_model_spec(spec: str, model_args: dict[str, Any] | None = None) -> str:
    """The spec as the store records it: a file path made absolute, the
    factory's arguments written as a call (``/abs/mlp.py:make(width=512)``).

    Example:
        >>> canonical_model_spec("pkg.models:make", {"width": 512, "act": "relu"})
        "pkg.models:make(width=512, act='relu')"
    """
    spec, named = split_model_spec(spec)
    kwargs = {**named, **(model_args or {})}
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        spec = f"{os.path.abspath(target)}:{name}"
    if kwargs:
        spec += "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return spec


FORMS = "x.npy, x.npz:KEY or a Zarr array directory"


def load_input(spec: str, flag: str = "input") -> Any:
    """An input array from ``x.npy``, ``x.npz:key`` or a Zarr array path.

    The one reader of every array a subcommand takes (``--x1``, ``--labels``,
    ...); ``flag`` names the option in its messages. ``.npy`` files are
    memory-mapped; Zarr arrays stay on disk and are read tile by tile by the
    workers; a ``.npz`` member is read whole.

    Raises:
        InputError: the file does not exist or holds no such array.
    """
    path, key = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".npz"):
        path, key = head, tail
    if not os.path.exists(path):
        raise InputError(
            f"{flag} {spec}: no such file or directory (looked at "
            f"{os.path.abspath(path)}); expected {FORMS}."
        )
    import numpy as np

    if path.endswith(".npy"):
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as err:
            dtype = _npy_dtype(path)
            if dtype is not None and dtype.hasobject:
                raise InputError(
                    f"{flag} {spec} holds an array of Python objects (dtype "
                    f"{dtype}), not numbers; save a numeric array instead, e.g. "
                    "np.save(path, np.asarray(x, dtype=np.float32))."
                ) from err
            raise InputError(f"{flag} {spec} cannot be read as .npy: {err}") from err
    if path.endswith(".npz"):
        return _npz_member(path, key, flag)
    import zarr

    try:
        return zarr.open_array(store=path, mode="r")
    except Exception as err:
        raise InputError(
            f"{flag} {spec} is neither a .npy file, a .npz file nor a Zarr array "
            f"({type(err).__name__}: {err}); expected {FORMS}."
        ) from err


def _npz_member(path: str, key: str | None, flag: str) -> Any:
    """The array ``key`` of a ``.npz`` file (its only one when ``key`` is None)."""
    import numpy as np

    try:
        data = np.load(path)
    except Exception as err:
        raise InputError(
            f"{flag} {path} cannot be read as .npz ({type(err).__name__}: {err})."
        ) from err
    with data:
        keys = list(data.keys())
        if key is None and len(keys) == 1:
            key = keys[0]
        if key is None:
            raise InputError(
                f"{flag} {path} holds {len(keys)} arrays ({', '.join(keys)}); name "
                f"one as {path}:KEY, e.g. {flag} {path}:{keys[0] if keys else 'x'}."
            )
        if key not in keys:
            raise InputError(
                f"{flag} {path}:{key}: {path} has no array {key!r}; it holds "
                f"{', '.join(keys) or 'none'} (pass {path}:KEY with one of them)."
            )
        return data[key]


def _npy_dtype(path: str) -> Any:
    """The dtype in a ``.npy`` file's header, or ``None`` if it has none."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            return read(f)[2]
    except Exception:
        return None


def _enable_x64_for(x: Any) -> None:
    """Compute float64 inputs in float64 (JAX's default would be float32)."""
    import numpy as np

    if np.dtype(x.dtype) == np.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
