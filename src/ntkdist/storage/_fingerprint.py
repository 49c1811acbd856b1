"""The job fingerprint: one short hash per field that decides the kernel's values."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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
# Rows a NaN/inf refusal names (their count is always given).
ROWS_NAMED = 5
# Params leaves a description lists (their count is always given).
LEAVES_NAMED = 6


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


def describe_array(x: Any) -> str:
    """``float32 [1797, 64]``: an array's dtype and shape, as messages show them."""
    return f"{np.dtype(x.dtype)} [{', '.join(str(int(s)) for s in x.shape)}]"


def describe_params(params: Any) -> str:
    """The params' leaves (path, dtype, shape; the first few) and their sum.

    The sum is a checksum a reader can compare at a glance: equal trees with
    different values almost always differ in it.

    Example:
        >>> describe_params({"b": np.zeros(2), "w": np.ones((3, 2))})
        "2 leaves ['b'] float64 [2], ['w'] float64 [3, 2], sum 6"
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    named = ", ".join(
        f"{jax.tree_util.keystr(path) or '.'} {describe_array(np.asarray(leaf))}"
        for path, leaf in flat[:LEAVES_NAMED]
    )
    more = f" and {len(flat) - LEAVES_NAMED} more" if len(flat) > LEAVES_NAMED else ""
    total = sum(float(np.sum(np.asarray(leaf), dtype=np.float64)) for _, leaf in flat)
    return (
        f"{len(flat)} lea{'f' if len(flat) == 1 else 'ves'} {named}{more}, "
        f"sum {total:.10g}"
    )


def model_fingerprint(model: Model, params: Any, x_probe: Any) -> tuple[str, str]:
    """:func:`model_digest` and a description: the function, its jaxpr's size."""
    closed = jax.make_jaxpr(model)(params, x_probe)
    parts: list[bytes | str] = [str(closed.jaxpr)]
    for c in closed.consts:
        a = np.ascontiguousarray(np.asarray(c))
        parts += [f"{a.dtype.str}{a.shape}", a.tobytes()]
    fn = model.apply_fn
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    words = (
        f"{name}: {len(closed.jaxpr.eqns)} jaxpr equations, "
        f"{len(closed.consts)} constants"
    )
    return digest(*parts), words


def model_digest(model: Model, params: Any, x_probe: Any) -> str:
    """Hash of what the model computes: its jaxpr on one sample, and its constants.

    Two functions that trace to the same jaxpr with the same constants
    compute the same kernel, whatever their names; any change to the
    computation, or to an array the function closes over, changes it.
    """
    return model_fingerprint(model, params, x_probe)[0]


def nonfinite_error(name: str, rows: Any, count: int, n: int) -> InputError:
    """The refusal of an input whose rows ``rows`` (the first few of ``count``
    such rows, of ``n``) hold NaN or inf."""
    shown = ", ".join(str(int(r)) for r in rows[:ROWS_NAMED])
    if count > ROWS_NAMED:
        shown += ", ..."
    return InputError(
        f"{name} rows {shown} ({count} row{'' if count == 1 else 's'} of {n}) hold "
        "NaN or inf; the kernel rows of those samples would be NaN. Clean the data "
        "(or pass check_finite=False to compute anyway).",
        keywords=["check_finite=False"],
    )


def first_differing_row(a: Any, b: Any) -> int | None:
    """The first row where two arrays of one shape differ (``None``: none does).

    Read in row blocks, as :func:`array_digest` reads.
    """
    n = int(a.shape[0])
    row_bytes = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize)
    step = max(1, HASH_BLOCK_BYTES // row_bytes)
    for start in range(0, n, step):
        ba, bb = (np.asarray(_rows(x, start, step)) for x in (a, b))
        same = (
            (ba == bb) | (np.isnan(ba) & np.isnan(bb))
            if ba.dtype.kind == "f"
            else (ba == bb)
        )
        bad = np.flatnonzero(~same.reshape(len(ba), -1).all(axis=1))
        if len(bad):
            return start + int(bad[0])
    return None


def _rows(x: Any, start: int, step: int) -> Any:
    block = x[start : start + step]
    return block.compute() if hasattr(block, "compute") else block


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
    bad: list[int] = []
    count = 0
    for start in range(0, shape[0], step):
        block = np.ascontiguousarray(np.asarray(_rows(x, start, step), dtype=dtype))
        if check_finite and np.issubdtype(dtype, np.floating):
            rows = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))
            count += len(rows)
            bad += [start + int(r) for r in rows[: ROWS_NAMED - len(bad)]]
        h.update(block.tobytes())
    if count:
        raise nonfinite_error(name, bad, count, shape[0])
    return h.hexdigest()


def fingerprint(fields: dict[str, str]) -> str:
    """One hash over all fields.

    Example:
        >>> len(fingerprint({"model": "ab", "params": "cd"}))
        32
    """
    h = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16)
    return h.hexdigest()


def check_same_job(
    stored: Mapping[str, str],
    new: Mapping[str, str],
    where: str,
    *,
    stored_words: Mapping[str, str] | None = None,
    new_words: Mapping[str, str] | None = None,
    arrays: Mapping[str, tuple[Any, Any]] | None = None,
) -> None:
    """Refuse to resume a store holding a different job.

    Args:
        stored: the store's fingerprint fields.
        new: this job's.
        where: the store's path.
        stored_words: descriptions of the store's fields (``trace``, ``float32
            [20, 4]``); a field without one is shown by its hash.
        new_words: descriptions of this job's fields.
        arrays: ``{"x1": (stored, new)}``: inputs to compare row by row when
            their hashes differ but their shapes agree (``stored`` may be
            ``None``: not readable).

    Raises:
        ResumeMismatchError: naming every field that differs, with both values.
    """
    names = [k for k in FIELDS if k in stored or k in new]
    names += sorted((set(stored) | set(new)) - set(names))
    diff = {
        k: (stored.get(k), new.get(k)) for k in names if stored.get(k) != new.get(k)
    }
    if diff:
        listed = ", ".join(
            _difference(k, stored, new, stored_words or {}, new_words or {}, arrays)
            for k in diff
        )
        raise ResumeMismatchError(
            f"the store at {where} holds a different job: {listed} differ"
            f"{'s' if len(diff) == 1 else ''}. Resume with the same model, params, "
            "inputs and options, or pass overwrite=True (CLI: --overwrite) to "
            "discard it and start over, or choose another store path.",
            diff,
            keywords=["overwrite=True"],
        )


def resume_words(
    kstore: Any, described: Mapping[str, str], new: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`check_same_job`'s keywords to explain a refusal to resume
    ``kstore`` with the job described as ``described`` on inputs ``new``."""
    return {
        "stored_words": kstore.spec.readable(),
        "new_words": described,
        "arrays": stored_inputs(kstore, new),
    }


def stored_inputs(kstore: Any, new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"x1": (the store's x1, new["x1"]), ...}`` for :func:`check_same_job`.

    A stored input that cannot be opened (moved, deleted) is ``None``.
    """
    import zarr

    pairs: dict[str, tuple[Any, Any]] = {}
    for name, x in new.items():
        record = kstore.spec.inputs.get(name)
        if x is None or record is None:
            continue
        try:
            old = zarr.open_array(
                store=record.root or kstore.path, path=record.path, mode="r"
            )
        except Exception:
            old = None
        pairs[name] = (old, x)
    return pairs


def _difference(
    k: str,
    stored: Mapping[str, str],
    new: Mapping[str, str],
    stored_words: Mapping[str, str],
    new_words: Mapping[str, str],
    arrays: Mapping[str, tuple[Any, Any]] | None,
) -> str:
    """``output (stored trace, now pntk)``; hashes where a side has no words."""
    a, b = stored_words.get(k), new_words.get(k)
    if a is None or b is None:
        text = f"{k} (stored {stored.get(k)}, now {new.get(k)}"
    elif a == b and k not in (arrays or {}):
        text = f"{k} ({a}; hashes stored {stored.get(k)}, now {new.get(k)}"
    else:
        text = f"{k} (stored {a}; now {b}"
    pair = (arrays or {}).get(k)
    if pair is not None and pair[0] is not None and pair[1] is not None:
        old, now = pair
        if tuple(old.shape) == tuple(now.shape) and old.dtype == now.dtype:
            try:
                row = first_differing_row(old, now)
            except Exception:  # the stored input moved or is unreadable
                row = None
            if row is not None:
                text += f"; first differing row {row}"
    return text + ")"
