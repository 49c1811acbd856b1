"""Kernel inputs of the consumers: numpy arrays, zarr arrays and kernel stores.

A :class:`KernelSource` is the one view the consumers (regression, prediction,
spectrum) take of a kernel, whatever holds it. It reads the kernel block by
block along the storage chunk grid, in float64, so a kernel larger than memory
is never loaded whole, and it acts on a block of vectors as a linear operator.

Operator conventions. Vectors are held as ``X[n, w, m]``: ``n`` samples, ``w``
output rows per sample and ``m`` right-hand sides.

- ``full`` kernels ``Θ[i, j, a, b]`` are the ``(N·O × N·O)`` matrix with row
  index ``i*O + a``; ``w = O``.
- ``trace`` and ``pntk`` kernels ``K[i, j]`` act as ``K ⊗ I``: every column is
  an independent scalar problem; ``w = 1`` and label columns go into ``m``.
- ``diagonal`` kernels ``K[i, j, a]`` act as the block-diagonal operator
  ``(K X)[i, a] = Σ_j K[i, j, a] X[j, a]`` (the ``full`` layout with the
  ``a ≠ b`` entries zero); ``w = O``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, final

import numpy as np
import zarr

from .._errors import (
    FingerprintMismatchError as FingerprintMismatchError,
    IncompleteKernelError as IncompleteKernelError,
    InputError,
    KernelInputError as KernelInputError,
)
from .._outputs import OUTPUT_AXES
from .._units import parse_bytes

OUTPUT_NDIM = {k: 2 + axes for k, axes in OUTPUT_AXES.items()}
NDIM_OUTPUT = {4: "full", 3: "diagonal", 2: "trace"}
DEFAULT_BUDGET = "4GiB"


def parse_budget(budget: int | float | str | None) -> int:
    """A memory budget in bytes: an int, a float, or a string such as ``"2GiB"``.

    Example:
        >>> parse_budget("1KiB")
        1024
    """
    if budget is None:
        budget = DEFAULT_BUDGET
    value = int(parse_bytes(budget) or 0)
    if value <= 0:
        raise InputError(f"memory_budget={budget!r} must be positive.")
    return value


@final
@dataclasses.dataclass(frozen=True, eq=False)
class KernelSource:
    """A kernel seen as a linear operator whose blocks stream from storage.

    Attributes:
        array: the stored kernel, ``numpy.ndarray`` or ``zarr.Array`` of shape
            ``(n1, n2)``, ``(n1, n2, O)`` or ``(n1, n2, O, O)``.
        output: ``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``.
        name: what error messages call this kernel.
        fields: the store's fingerprint fields, or ``None`` for bare arrays.
        symmetric: the stored array is exactly symmetric, so only the upper
            triangle of blocks needs reading.
        transposed: the kernel used is the transpose of the stored one (a
            train × test store used as a test × train kernel).
        out_dim: ``O`` as recorded by the store (``None`` when unknown).
    """

    array: Any
    output: str
    name: str
    fields: Mapping[str, str] | None = None
    symmetric: bool = False
    transposed: bool = False
    out_dim: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` in samples, after any transpose."""
        n1, n2 = int(self.array.shape[0]), int(self.array.shape[1])
        return (n2, n1) if self.transposed else (n1, n2)

    @property
    def width(self) -> int:
        """Operator rows per sample: ``O`` for full and diagonal, else 1."""
        return 1 if self.array.ndim == 2 else int(self.array.shape[2])

    @property
    def stored_chunks(self) -> tuple[int, int]:
        """Row and column extent of one stored chunk (or shard)."""
        if isinstance(self.array, zarr.Array):
            grid = self.array.shards or self.array.chunks
            return int(grid[0]), int(grid[1])
        return int(self.array.shape[0]), int(self.array.shape[1])

    def transpose(self) -> KernelSource:
        """The same stored kernel, used transposed."""
        return dataclasses.replace(self, transposed=not self.transposed)

    # ---- reading -----------------------------------------------------------

    def _read(
        self, r0: int, r1: int, c0: int, c1: int, *, check: bool = True
    ) -> np.ndarray:
        block = np.asarray(self.array[r0:r1, c0:c1], dtype=np.float64)
        if check and np.isnan(block).any():
            self._unwritten(r0, r1, c0, c1)
        return block

    def _unwritten(self, r0: int, r1: int, c0: int, c1: int) -> None:
        raise IncompleteKernelError(
            f"{self.name} holds NaN in stored rows {r0}:{r1}, columns {c0}:{c1}: "
            "those tiles were never written (NaN is the store's fill value). "
            "Finish or resume the kernel computation before using it."
        )

    def _block_grid(
        self, block_bytes: int, upper: bool
    ) -> list[tuple[int, int, int, int]]:
        n1, n2 = int(self.array.shape[0]), int(self.array.shape[1])
        rc, cc = self.stored_chunks
        per_entry = 8 * max(1, int(np.prod(self.array.shape[2:], dtype=np.int64)))
        if not isinstance(self.array, zarr.Array):
            rc = max(1, min(n1, block_bytes // max(1, n2 * per_entry)))
            cc = n2
        rows_per = rc
        cols_per = max(1, block_bytes // max(1, rows_per * cc * per_entry)) * cc
        grid = []
        for r0 in range(0, n1, rows_per):
            r1 = min(n1, r0 + rows_per)
            start = r0 if upper else 0
            for c0 in range(start, n2, cols_per):
                grid.append((r0, r1, c0, min(n2, c0 + cols_per)))
        return grid

    def blocks(
        self, block_bytes: int, *, upper: bool = False
    ) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """Stored blocks ``(r0, r1, c0, c1, block)`` in float64, one read ahead.

        Blocks follow the chunk grid: one chunk row high and as many whole
        chunk columns wide as ``block_bytes`` allows (at least one chunk). With
        ``upper`` only blocks on or above the diagonal are read (square chunks).
        Blocks are not scanned for NaN (unwritten tiles): :meth:`matmat` finds
        them in its products, since NaN propagates through every product.
        """
        grid = self._block_grid(block_bytes, upper)
        if not grid:
            return
        if not isinstance(self.array, zarr.Array):
            for r0, r1, c0, c1 in grid:
                yield r0, r1, c0, c1, self._read(r0, r1, c0, c1, check=False)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, *grid[0], check=False)
            for k, (r0, r1, c0, c1) in enumerate(grid):
                block = pending.result()
                if k + 1 < len(grid):
                    pending = pool.submit(self._read, *grid[k + 1], check=False)
                yield r0, r1, c0, c1, block

    def dense(self) -> np.ndarray:
        """The whole kernel in float64, transposed if asked (reads everything)."""
        n1, n2 = int(self.array.shape[0]), int(self.array.shape[1])
        out = self._read(0, n1, 0, n2)
        if self.transposed:
            axes = (1, 0, 3, 2) if out.ndim == 4 else (1, 0, *range(2, out.ndim))
            out = np.ascontiguousarray(out.transpose(axes))
        return out

    def dense_matrices(self) -> list[np.ndarray]:
        """The kernel as independent square-or-not matrices.

        One ``(n1·O, n2·O)`` matrix for full, one ``(n1, n2)`` for trace/pntk,
        and ``O`` matrices ``K[:, :, a]`` for diagonal.
        """
        k = self.dense()
        if self.output == "full":
            n1, n2, o, _ = k.shape
            return [
                np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(n1 * o, n2 * o)
            ]
        if self.output == "diagonal":
            return [np.ascontiguousarray(k[:, :, a]) for a in range(k.shape[2])]
        return [k]

    def dense_bytes(self) -> int:
        """Bytes of the whole kernel in float64."""
        return 8 * int(np.prod(self.array.shape, dtype=np.int64))

    def diagonal(self) -> np.ndarray:
        """The operator's diagonal ``d[i, a]``, ``(n, w)``; reads diagonal tiles."""
        n = self.shape[0]
        out = np.empty((n, self.width))
        for r0, r1, block in self.diagonal_blocks():
            idx = np.arange(r1 - r0)
            if block.ndim == 4:
                out[r0:r1] = block[idx, idx][
                    :, np.arange(self.width), np.arange(self.width)
                ]
            elif block.ndim == 3:
                out[r0:r1] = block[idx, idx]
            else:
                out[r0:r1, 0] = block[idx, idx]
        return out

    def diagonal_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Square diagonal tiles ``(r0, r1, block)``, one stored chunk row each."""
        n = min(self.array.shape[0], self.array.shape[1])
        step = self.stored_chunks[0]
        if not isinstance(self.array, zarr.Array):
            step = min(n, 1024)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            yield r0, r1, self._read(r0, r1, r0, r1)

    # ---- the operator ------------------------------------------------------

    def matmat(self, x: np.ndarray, block_bytes: int) -> np.ndarray:
        """``K @ X`` for ``X[n_cols, w, m]``, one pass over the stored blocks.

        Returns:
            ``Y[n_rows, w, m]`` in float64.
        """
        n_rows, n_cols = self.shape
        if x.shape[:2] != (n_cols, self.width):
            raise KernelInputError(
                f"{self.name} acts on vectors of shape ({n_cols}, {self.width}, m); "
                f"got {x.shape}."
            )
        out = np.zeros((n_rows, self.width, x.shape[2]))
        upper = self.symmetric and len(set(self.stored_chunks)) == 1
        # A symmetric kernel is its own transpose.
        transposed = self.transposed and not upper
        for r0, r1, c0, c1, block in self.blocks(block_bytes, upper=upper):
            if transposed:
                _apply(block, x[r0:r1], out[c0:c1], transpose=True)
                touched = out[c0:c1]
            else:
                _apply(block, x[c0:c1], out[r0:r1], transpose=False)
                touched = out[r0:r1]
            if np.isnan(touched).any() and np.isnan(block).any():
                self._unwritten(r0, r1, c0, c1)
            if upper:
                # The mirrored lower-triangle part of this block row.
                skip = max(0, r1 - c0)
                if c1 > c0 + skip:
                    part = block[:, skip:]
                    _apply(part, x[r0:r1], out[c0 + skip : c1], transpose=True)
        return out


def _apply(
    block: np.ndarray, x: np.ndarray, out: np.ndarray, *, transpose: bool
) -> None:
    """``out += B @ x`` (or ``Bᵀ @ x``) for one stored block in operator layout."""
    r, c = block.shape[:2]
    m = x.shape[2]
    if block.ndim == 2:
        mat = block.T if transpose else block
        out[:, 0, :] += mat @ x[:, 0, :]
    elif block.ndim == 4:
        o = block.shape[2]
        mat = block.transpose(0, 2, 1, 3).reshape(r * o, c * o)
        if transpose:
            mat = mat.T
        n_in = x.shape[0]
        out += (mat @ x.reshape(n_in * o, m)).reshape(out.shape)
    else:
        bt = block.transpose(2, 0, 1)
        if transpose:
            bt = bt.transpose(0, 2, 1)
        out += (bt @ x.transpose(1, 0, 2)).transpose(1, 0, 2)


def as_kernel(
    kernel: Any,
    *,
    name: str = "kernel",
    output: str | None = None,
    allow_incomplete: bool = False,
) -> KernelSource:
    """Wrap a numpy array, ``zarr.Array`` or kernel store as a :class:`KernelSource`.

    A store is any object with ``.kernel`` (a ``zarr.Array``) and ``.output``;
    its ``.fields``, ``.symmetric``, ``.complete`` and ``.progress()`` are used
    when present.

    Args:
        kernel: the kernel.
        name: what error messages call it (``"train kernel"``).
        output: the output form; inferred from the number of axes for arrays
            (2 → ``"trace"``, which consumers treat exactly as ``"pntk"``).
        allow_incomplete: accept an unfinished store (reading a NaN still fails).

    Returns:
        The wrapped kernel.

    Raises:
        KernelInputError: the object is not a kernel, or its shape does not
            match its output form.
        IncompleteKernelError: the store is unfinished and ``allow_incomplete``
            is false.

    Example:
        >>> import numpy as np
        >>> as_kernel(np.eye(3)).output
        'trace'
    """
    if isinstance(kernel, KernelSource):
        return kernel
    store_array = getattr(kernel, "kernel", None)
    if store_array is not None and getattr(kernel, "output", None) is not None:
        return _from_store(kernel, name=name, allow_incomplete=allow_incomplete)
    if not isinstance(kernel, np.ndarray | zarr.Array):
        kernel = np.asarray(kernel)
    if output is None and isinstance(kernel, zarr.Array):
        recorded = kernel.attrs.get("output")
        output = recorded if isinstance(recorded, str) else None
    return _checked(kernel, name, output, fields=None, symmetric=False, out_dim=None)


def _from_store(store: Any, *, name: str, allow_incomplete: bool) -> KernelSource:
    if not bool(store.complete) and not allow_incomplete:
        done, total = store.progress()
        raise IncompleteKernelError(
            f"{name} store is unfinished ({done} of {total} tiles written). Resume "
            "the computation to finish it, or pass allow_incomplete=True to use it "
            "anyway (reading an unwritten tile still fails)."
        )
    fields = dict(store.fields) if getattr(store, "fields", None) is not None else None
    out_dim = getattr(store, "out_dim", None)
    return _checked(
        store.kernel,
        name,
        str(store.output),
        fields=fields,
        symmetric=bool(getattr(store, "symmetric", False)),
        out_dim=None if out_dim is None else int(out_dim),
    )


def _checked(
    array: Any,
    name: str,
    output: str | None,
    *,
    fields: dict[str, str] | None,
    symmetric: bool,
    out_dim: int | None,
) -> KernelSource:
    ndim = array.ndim
    if output is None:
        if ndim not in NDIM_OUTPUT:
            raise KernelInputError(
                f"{name} has shape {tuple(array.shape)}; expected (N1, N2) for "
                "trace/pntk, (N1, N2, O) for diagonal or (N1, N2, O, O) for full."
            )
        output = NDIM_OUTPUT[ndim]
    if output not in OUTPUT_NDIM:
        raise KernelInputError(
            f"{name} has output={output!r}; expected one of {list(OUTPUT_NDIM)}."
        )
    if ndim != OUTPUT_NDIM[output] or (
        output == "full" and array.shape[2] != array.shape[3]
    ):
        raise KernelInputError(
            f"{name} has shape {tuple(array.shape)}, which is not a {output!r} kernel "
            f"({OUTPUT_NDIM[output]} axes: see ntkdist.ntk's docstring for the shapes)."
        )
    if not np.issubdtype(np.dtype(array.dtype), np.floating):
        raise KernelInputError(
            f"{name} has dtype {array.dtype}; expected a floating-point kernel."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise KernelInputError(f"{name} is empty (shape {tuple(array.shape)}).")
    if ndim > 2:
        out_dim = int(array.shape[2])
    return KernelSource(
        array=array,
        output=output,
        name=name,
        fields=fields,
        symmetric=symmetric,
        out_dim=out_dim,
    )


def check_square(source: KernelSource) -> None:
    """A training kernel must be ``N × N`` (``x2 = x1``)."""
    n1, n2 = source.shape
    if n1 != n2:
        raise KernelInputError(
            f"{source.name} has shape {tuple(source.array.shape)}; a training "
            "kernel must be square (computed with x2=None or x2=x1)."
        )
    f = source.fields
    if (
        f is not None
        and not source.symmetric
        and f.get("x2") not in (None, f.get("x1"))
    ):
        raise FingerprintMismatchError(
            f"{source.name} was computed between two different input sets (x1 "
            f"{f.get('x1')}, x2 {f.get('x2')}); a training kernel needs x2=x1."
        )


def match_cross(train: KernelSource, cross: KernelSource) -> KernelSource:
    """Check a test × train kernel against the training kernel; orient it.

    Args:
        train: the training kernel (``N × N``).
        cross: a kernel between test inputs and the training inputs, stored
            as test × train (``x2`` = training set, neural-tangents'
            ``k_test_train``) or, for stores, as train × test.

    Returns:
        ``cross``, transposed if it was stored train × test.

    Raises:
        FingerprintMismatchError: the stores differ in model, params or output,
            or the cross kernel's training side is not the training set.
        KernelInputError: shapes or output forms do not fit.
    """
    if cross.output != train.output and {cross.output, train.output} != {
        "trace",
        "pntk",
    }:
        raise KernelInputError(
            f"{cross.name} is a {cross.output!r} kernel but {train.name} is "
            f"{train.output!r}; compute both with the same output form."
        )
    if train.fields is not None and cross.fields is not None:
        cross = _match_fields(train, cross)
    n = train.shape[0]
    if cross.shape[1] != n:
        raise KernelInputError(
            f"{cross.name} has shape {tuple(cross.array.shape)}; expected "
            f"(n_test, {n}, ...): test rows against the {n} training samples "
            "(compute it as ntk(f, params, x_test, x_train))."
        )
    if cross.width != train.width:
        raise KernelInputError(
            f"{cross.name} has {cross.width} outputs per sample but {train.name} "
            f"has {train.width}; both must come from the same model."
        )
    return cross


def _match_fields(train: KernelSource, cross: KernelSource) -> KernelSource:
    tf, cf = train.fields, cross.fields
    assert tf is not None and cf is not None
    for key in ("model", "params", "output"):
        if key in tf and key in cf and tf[key] != cf[key]:
            raise FingerprintMismatchError(
                f"{cross.name} and {train.name} differ in their {key!r} fingerprint "
                f"({cf[key]} vs {tf[key]}): the cross kernel must be computed with "
                "the same model, parameters and output form as the training kernel."
            )
    if cf.get("x2") == tf.get("x1"):
        return cross
    if cf.get("x1") == tf.get("x1"):
        return cross.transpose()
    raise FingerprintMismatchError(
        f"{cross.name} was not computed against {train.name}'s training set: its "
        f"inputs hash to x1={cf.get('x1')}, x2={cf.get('x2')} but the training set "
        f"hashes to {tf.get('x1')}. Compute it as ntk(f, params, x_test, x_train) "
        "with the same x_train."
    )
