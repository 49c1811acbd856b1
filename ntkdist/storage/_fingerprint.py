"""The job fingerprint: one short hash per field that decides the kernel's values."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np

from .._errors import InputError, ResumeMismatchError
from .._model import Model

# Fields, in the order messages list them. Each maps to a short hash.
FIELDS = (
    "model",
    "params",
    "x1",
    "x2",
    "output",
    "strategy",
    "dtype",
    "tile",
    "versions",
)
# Input rows hashed (and checked) per read: bounds the coordinator's memory.
HASH_BLOCK_BYTES = 64 * 2**20


def digest(*parts: bytes | str) -> str:
    """A 16-hex-digit BLAKE2b digest of the parts.

    Example:
        >>> digest("a", b"b") == digest("a", b"b") != digest("ab")
        True
    """
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def params_digest(params: Any) -> str:
    """Hash of the params' tree structure, shapes, dtypes and bytes."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    parts: list[bytes | str] = [str(treedef)]
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        parts += [f"{a.dtype.str}{a.shape}", a.tobytes()]
    return digest(*parts)


def model_digest(model: Model, params: Any, x_probe: Any) -> str:
    """Hash of what the model computes: its jaxpr on one sample, and its constants.

    Two functions that trace to the same jaxpr with the same constants
    compute the same kernel, whatever their names; any change to the
    computation, or to an array the function closes over, changes it.
    """
    closed = jax.make_jaxpr(model)(params, x_probe)
    parts: list[bytes | str] = [str(closed.jaxpr)]
    for c in closed.consts:
        a = np.ascontiguousarray(np.asarray(c))
        parts += [f"{a.dtype.str}{a.shape}", a.tobytes()]
    return digest(*parts)


def array_digest(x: Any, name: str, *, check_finite: bool = True) -> str:
    """Hash of an input's shape, dtype and values, read in row blocks.

    Works for numpy, zarr and dask arrays without loading them whole; checks
    finiteness on the way.

    Raises:
        InputError: the input holds NaN or inf (with ``check_finite``).
    """
    dtype = np.dtype(x.dtype)
    shape = tuple(int(s) for s in x.shape)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, HASH_BLOCK_BYTES // row_bytes)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{dtype.str}{shape}".encode())
    for start in range(0, shape[0], step):
        block = x[start : start + step]
        if hasattr(block, "compute"):
            block = block.compute()
        block = np.ascontiguousarray(np.asarray(block, dtype=dtype))
        if (
            check_finite
            and np.issubdtype(dtype, np.floating)
            and not np.isfinite(block).all()
        ):
            raise InputError(
                f"{name} holds NaN or inf (in rows {start}..{start + len(block) - 1}); "
                "the kernel rows of those samples would be NaN. Clean the data "
                "(or pass check_finite=False to compute anyway)."
            )
        h.update(block.tobytes())
    return h.hexdigest()


def fingerprint(fields: dict[str, str]) -> str:
    """One hash over all fields.

    Example:
        >>> len(fingerprint({"model": "ab", "params": "cd"}))
        32
    """
    h = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16)
    return h.hexdigest()


def check_same_job(stored: dict[str, str], new: dict[str, str], where: str) -> None:
    """Refuse to resume a store holding a different job.

    Raises:
        ResumeMismatchError: naming every field that differs, with both hashes.
    """
    names = [k for k in FIELDS if k in stored or k in new]
    names += sorted(set(stored) | set(new) - set(names))
    diff = {
        k: (stored.get(k), new.get(k)) for k in names if stored.get(k) != new.get(k)
    }
    if diff:
        listed = ", ".join(f"{k} (stored {a}, now {b})" for k, (a, b) in diff.items())
        raise ResumeMismatchError(
            f"the store at {where} holds a different job: {listed} differ"
            f"{'s' if len(diff) == 1 else ''}. Resume with the same model, params, "
            "inputs and options, or pass overwrite=True (CLI: --overwrite) to "
            "discard it and start over, or choose another store path.",
            diff,
        )
