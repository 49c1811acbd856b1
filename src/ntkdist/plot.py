"""Heat-maps of stored kernels, read block by block (``ntkdist plot``).

:func:`plot_kernel` draws one block of a kernel (the whole kernel when it is
small) as an image with a colour bar. It reads the block a strip of rows at a
time, so memory holds the picture, never more than the block: a kernel
larger than ``max_size`` along an axis is shown as a strided subsample, and
the title says so. Needs matplotlib (``pip install 'ntkdist[plot]'``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import KernelInputError

# Samples per axis drawn by default: larger blocks are subsampled with a stride.
MAX_SIZE = 2048
# Kernel values read at once while streaming a block (rows × cols × outputs).
_STRIP_ITEMS = 1 << 23


@dataclass(frozen=True)
class KernelImage:
    """One 2-D picture of a kernel block and how it was taken from the kernel.

    Attributes:
        values: ``[rows, cols]`` float64 values drawn (NaN where unwritten).
        rows: the ``x1`` sample of each image row.
        cols: the ``x2`` sample of each image column.
        steps: the subsampling stride along rows and columns (1: every sample).
        what: the output entry shown, e.g. ``"trace kernel"``.
        row_labels: the label of each image row when sorted by labels.
        col_labels: the same for the columns.
    """

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    steps: tuple[int, int]
    what: str
    row_labels: np.ndarray | None = None
    col_labels: np.ndarray | None = None


def _span(span: tuple[int, int] | None, n: int, axis: str) -> tuple[int, int]:
    if span is None:
        return 0, n
    start, stop = (int(v) for v in span)
    if not 0 <= start < stop <= n:
        raise KernelInputError(
            f"{axis} block {start}:{stop} is not within the kernel's {n} samples "
            f"along {axis}; pass START:STOP with 0 <= START < STOP <= {n}."
        )
    return start, stop


def _class_labels(labels: Any, n: int, axis: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 2:  # one-hot or scores: the class is the largest column
        lab = lab.argmax(axis=1)
    if lab.ndim != 1 or len(lab) != n:
        raise KernelInputError(
            f"labels of shape {np.shape(labels)} do not match the kernel's {n} "
            f"{axis} samples; pass one label per sample ([{n}] or [{n}, C])."
        )
    return lab


def _indices(
    span: tuple[int, int], max_size: int, labels: np.ndarray | None
) -> tuple[np.ndarray, Any, int]:
    """The samples drawn along one axis, how to read them, and the stride."""
    start, stop = span
    step = max(1, math.ceil((stop - start) / max_size))
    idx = np.arange(start, stop, step)
    if labels is None:
        return idx, slice(start, stop, step), step
    idx = idx[np.argsort(labels[idx], kind="stable")]
    return idx, idx, step


def _reduce(block: np.ndarray, out1: int | None, out2: int | None) -> np.ndarray:
    """A strip ``[r, c, *out]`` read from the kernel, as ``[r, c]``."""
    if block.ndim == 2:
        return block
    if block.ndim == 3:
        return block.mean(axis=2) if out1 is None else block[:, :, out1]
    if out1 is None:
        return np.einsum("ijaa->ij", block) / block.shape[2]
    return block[:, :, out1, out2]


def _describe(output: str, out_dim: int, out1: int | None, out2: int | None) -> str:
    if output in ("trace", "pntk"):
        return f"{output} kernel"
    if out1 is None and output == "full":
        return f"full kernel, trace over its {out_dim} outputs (mean of K[i,j,a,a])"
    if out1 is None:
        return f"diagonal kernel, mean over its {out_dim} outputs"
    if output == "diagonal":
        return f"{output} kernel, output {out1}"
    return f"{output} kernel, outputs ({out1}, {out2})"


def kernel_image(
    kernel: Any,
    *,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    out1: int | None = None,
    out2: int | None = None,
    labels: Any | None = None,
    max_size: int = MAX_SIZE,
) -> KernelImage:
    """Read the block a heat-map shows, a strip of rows at a time.

    Args:
        kernel: a :class:`~ntkdist.KernelStore`, a zarr array or a numpy array
            of shape ``(N1, N2, *outputs)``.
        rows: ``(start, stop)`` of ``x1`` samples; ``None``: all.
        cols: ``(start, stop)`` of ``x2`` samples; ``None``: all.
        out1: for ``full`` kernels the first output index (``out2`` the second,
            default ``out1``); for ``diagonal`` the output. ``None``: the mean of
            the diagonal over outputs (the ``trace`` kernel).
        out2: see ``out1``.
        labels: one label per ``x1`` sample (ints, or ``[N, C]`` one-hot):
            rows, and the columns of a square kernel, are sorted by label.
        max_size: the most samples drawn per axis; a longer block is
            subsampled with the smallest stride that fits.

    Example:
        >>> k = np.arange(16.0).reshape(4, 4)
        >>> img = kernel_image(k, rows=(1, 3), max_size=2)
        >>> img.values, img.rows, img.cols
        (array([[ 4.,  6.],
               [ 8., 10.]]), array([1, 2]), array([0, 2]))
    """
    arr = getattr(kernel, "kernel", kernel)
    if arr.ndim not in (2, 3, 4):
        raise KernelInputError(
            f"a kernel has 2, 3 or 4 axes (N1, N2, outputs...); got shape {arr.shape}."
        )
    output = getattr(kernel, "output", {2: "trace", 3: "diagonal", 4: "full"}[arr.ndim])
    n1, n2 = int(arr.shape[0]), int(arr.shape[1])
    out_dim = int(arr.shape[2]) if arr.ndim > 2 else 1
    if arr.ndim == 2:
        out1 = out2 = None
    elif out1 is not None or out2 is not None:
        out1 = out2 if out1 is None else out1
        out2 = out1 if out2 is None else out2
        for name, v in (("out1", out1), ("out2", out2)):
            if not 0 <= int(v) < out_dim:  # type: ignore[arg-type]
                raise KernelInputError(
                    f"{name}={v} is not an output index of a kernel with "
                    f"{out_dim} outputs; pass 0 <= {name} < {out_dim}."
                )
    lab = None if labels is None else _class_labels(labels, n1, "x1")
    r_idx, r_sel, r_step = _indices(_span(rows, n1, "rows"), max_size, lab)
    square = n1 == n2 and getattr(kernel, "symmetric", True)
    c_lab = lab if square else None
    c_idx, c_sel, c_step = _indices(_span(cols, n2, "cols"), max_size, c_lab)
    values = np.empty((len(r_idx), len(c_idx)))
    strip = max(1, _STRIP_ITEMS // max(1, len(c_idx) * out_dim**2))
    for s in range(0, len(r_idx), strip):
        if isinstance(r_sel, slice):
            a = r_sel.start + s * r_step
            sel: Any = slice(a, min(r_sel.stop, a + strip * r_step), r_step)
        else:
            sel = r_sel[s : s + strip]
        if isinstance(arr, np.ndarray):
            block = arr[sel][:, c_sel]
        else:
            block = arr.get_orthogonal_selection((sel, c_sel))
        block = _reduce(np.asarray(block, float), out1, out2)
        values[s : s + len(block)] = block
    return KernelImage(
        values=values,
        rows=r_idx,
        cols=c_idx,
        steps=(r_step, c_step),
        what=_describe(output, out_dim, out1, out2),
        row_labels=None if lab is None else lab[r_idx],
        col_labels=None if c_lab is None else c_lab[c_idx],
    )


def _label_ticks(ax: Any, labels: np.ndarray, axis: str) -> None:
    """Lines between classes, and each class's name at its middle."""
    edges = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    bounds = np.concatenate([[0], edges, [len(labels)]])
    mids = (bounds[:-1] + bounds[1:]) / 2 - 0.5
    names = [str(labels[b]) for b in bounds[:-1]]
    line = ax.axhline if axis == "y" else ax.axvline
    for e in edges:
        line(e - 0.5, color="white", lw=0.6, alpha=0.8)
    if len(names) <= 40:
        (ax.set_yticks if axis == "y" else ax.set_xticks)(mids, names)


def plot_kernel(
    kernel: Any,
    path: str | os.PathLike[str],
    *,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    out1: int | None = None,
    out2: int | None = None,
    labels: Any | None = None,
    max_size: int = MAX_SIZE,
    title: str | None = None,
) -> str:
    """Save a PNG heat-map of a kernel block with a colour bar; returns the path.

    The arguments are :func:`kernel_image`'s; the title names the store, the
    output entry shown, the block and any subsampling stride. Colours span the
    1st to 99th percentile of the values (a diagonal far above the rest would
    flatten everything else; the colour bar's arrows mark values beyond), and
    a diverging map centred on 0 when values have both signs. Unwritten tiles
    (an unfinished store) are drawn grey.

    Raises:
        KernelInputError: a bad block, output index or labels, or matplotlib
            is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise KernelInputError(
            "plotting a kernel needs matplotlib; install it with "
            "`pip install 'ntkdist[plot]'` (or `pip install matplotlib`)."
        ) from err
    img = kernel_image(
        kernel,
        rows=rows,
        cols=cols,
        out1=out1,
        out2=out2,
        labels=labels,
        max_size=max_size,
    )
    arr = getattr(kernel, "kernel", kernel)
    n1, n2 = int(arr.shape[0]), int(arr.shape[1])
    if title is None:
        name = os.path.basename(os.path.normpath(getattr(kernel, "path", ""))) or (
            "kernel"
        )
        (r0, r1), (c0, c1) = _span(rows, n1, "rows"), _span(cols, n2, "cols")
        block = f"rows {r0}:{r1} of {n1}, cols {c0}:{c1} of {n2}"
        if img.steps != (1, 1):
            r, c = img.steps
            block += f", subsampled (stride {r}" + (f"×{c}" if c != r else "")
            block += f" to fit {max_size})"
        if img.row_labels is not None:
            block += ", sorted by label"
        title = f"{name}: {img.what}\n{block}"
    finite = img.values[np.isfinite(img.values)]
    lo, hi = (0.0, 1.0) if not finite.size else np.percentile(finite, [1, 99])
    if not lo < hi:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0, 1)
    if lo < 0 < hi:  # signed entries (cross-output): a diverging map around 0
        cmap, m = "RdBu_r", max(-lo, hi)
        lo, hi = -m, m
    else:
        cmap = "viridis"
    cmap = matplotlib.colormaps[cmap].with_extremes(bad="0.8")
    below = finite.size and finite.min() < lo
    above = finite.size and finite.max() > hi
    extend = {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[
        (int(bool(below)), int(bool(above)))
    ]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=150)
    sorted_ = img.row_labels is not None
    extent = None
    if not sorted_:
        extent = (
            img.cols[0] - 0.5,
            img.cols[-1] + 0.5,
            img.rows[-1] + 0.5,
            img.rows[0] - 0.5,
        )
    im = ax.imshow(
        img.values,
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        extent=extent,
        interpolation="nearest" if max(img.values.shape) <= 512 else "antialiased",
        aspect="equal" if len(img.rows) == len(img.cols) else "auto",
    )
    if sorted_:
        _label_ticks(ax, img.row_labels, "y")  # type: ignore[arg-type]
        ax.set_ylabel("x1 samples, by label")
        if img.col_labels is not None:
            _label_ticks(ax, img.col_labels, "x")
            ax.set_xlabel("x2 samples, by label")
        else:
            ax.set_xlabel("x2 sample")
    else:
        ax.set_xlabel("x2 sample")
        ax.set_ylabel("x1 sample")
    ax.set_title(title, fontsize=9)
    clipped = " (clipped to 1st–99th percentile)" if extend != "neither" else ""
    fig.colorbar(im, ax=ax, shrink=0.85, extend=extend, label="kernel value" + clipped)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    plt.close(fig)
    return os.fspath(path)
