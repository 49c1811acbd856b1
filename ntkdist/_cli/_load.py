"""Loading what the command line names: a model factory and input arrays.

MODEL is ``path/to/file.py:factory`` or ``package.module:factory``, where
``factory()`` returns ``(apply_fn, params)``. Inputs are ``.npy`` files,
``.npz`` files with a key (``data.npz:x``), or Zarr array paths.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any

from .._errors import InputError, ModelError


def load_model(spec: str) -> tuple[Any, Any]:
    """``(apply_fn, params)`` from ``file.py:factory`` or ``package.module:factory``.

    A module loaded from a file is registered for pickling by value, so
    worker processes that cannot import it still receive the model.

    Raises:
        InputError: the file, module or factory does not exist.
        ModelError: the factory fails or returns something else.
    """
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
    try:
        result = factory()
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


def canonical_model_spec(spec: str) -> str:
    """The spec with a file path made absolute (recorded in the store)."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        return f"{os.path.abspath(target)}:{name}"
    return spec


def load_input(spec: str) -> Any:
    """An input array from ``x.npy``, ``x.npz:key`` or a Zarr array path.

    ``.npy`` files are memory-mapped; Zarr arrays stay on disk and are read
    tile by tile by the workers.

    Raises:
        InputError: the file does not exist or holds no such array.
    """
    path, key = spec, None
    if ".npz:" in spec:
        path, key = spec.rsplit(":", 1)
    if not os.path.exists(path):
        raise InputError(
            f"input {spec!r} does not exist (looked at "
            f"{os.path.abspath(path)}); expected a .npy file, a .npz "
            "file with :key, or a Zarr array directory."
        )
    import numpy as np

    if path.endswith(".npy"):
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as err:
            dtype = _npy_dtype(path)
            if dtype is not None and dtype.hasobject:
                raise InputError(
                    f"input {spec!r} holds an array of Python objects (dtype "
                    f"{dtype}), not numbers; save a numeric array instead, e.g. "
                    "np.save(path, np.asarray(x, dtype=np.float32))."
                ) from err
            raise InputError(f"input {spec!r} cannot be read as .npy: {err}") from err
    if path.endswith(".npz"):
        with np.load(path) as data:
            keys = list(data.keys())
            if key is None and len(keys) == 1:
                key = keys[0]
            if key not in keys:
                raise InputError(
                    f"input {spec!r}: the .npz holds {keys}; pass "
                    f"{path}:KEY with one of them."
                )
            return data[key]
    import zarr

    try:
        return zarr.open_array(store=path, mode="r")
    except Exception as err:
        raise InputError(
            f"input {spec!r} is neither .npy, .npz nor a Zarr "
            f"array ({type(err).__name__}: {err})."
        ) from err


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
