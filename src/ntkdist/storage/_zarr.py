"""KernelStore: the Zarr v3 layout of one kernel job, its markers and checksums.

Layout of a store (a Zarr v3 group)::

    zarr.json              root attributes {"ntkdist": job spec} (coordinator only)
    kernel/                the kernel, chunks = one tile along both sample axes,
                           the O×O axes whole; fill NaN
    done/                  uint64 (grid1, grid2), chunks (1, 1): done[i, j] is the
                           checksum of kernel block (i, j), written after its data;
                           a tile's marker is done[i, j] of the tile it names
    inputs/x1, inputs/x2   copies of in-memory inputs, chunked by tile rows

Every array carries Zarr v3 ``dimension_names`` (:func:`kernel_dims`;
``done``: ``tile1, tile2``; ``inputs/x1``: ``x1, x1_feature_0, ...``), so
``xarray.open_zarr(path, consolidated=False)`` opens the root (and
``group="inputs"`` the inputs) as labelled datasets. Stores written before
the names were added open with ntkdist all the same.

The job spec's schema is :class:`ntkdist.storage._spec.StoreSpec`; what a task
writes (a tile, its mirror, their checksums) is in :mod:`ntkdist.storage._tiles`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync

from .._errors import StoreError
from .._outputs import kernel_shape
from .._planner import Plan, Tile
from ._spec import StoreSpec
from ._tiles import checksum

ATTR = "ntkdist"
CREATING = "ntkdist_creating"

# Kernel chunks are stored uncompressed: kernel values compress by 3-16 %
# (zstd, blosc-lz4 with shuffle) while compressing a tile took longer than
# computing it (80 MiB tile: zstd 1.6 s, blosc 0.6 s, none 0.1 s).
KERNEL_COMPRESSORS = None

# The kernel's axes per output form: the two sample axes, then its output axes.
_OUTPUT_DIMS = {"full": ("out1", "out2"), "diagonal": ("out",)}


def kernel_dims(output: str) -> tuple[str, ...]:
    """The kernel array's ``dimension_names`` for an output form.

    ``x1`` and ``x2`` are distinct names even when the kernel is symmetric,
    so each keeps its own size in an xarray dataset.

    Example:
        >>> kernel_dims("full"), kernel_dims("trace")
        (('x1', 'x2', 'out1', 'out2'), ('x1', 'x2'))
    """
    return ("x1", "x2", *_OUTPUT_DIMS.get(output, ()))


StoreState = Literal["absent", "empty", "creating", "ntkdist", "other"]


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ``file://``, ...)."""
    return "://" in path


def _local(path: str) -> str:
    return os.path.abspath(
        os.path.expanduser(path[7:] if path.startswith("file://") else path)
    )


def store_state(path: str) -> StoreState:
    """What a store path holds now: nothing, an ntkdist store, or something else."""
    if not is_url(path):
        p = _local(path)
        if not os.path.exists(p):
            return "absent"
        if os.path.isdir(p) and not os.listdir(p):
            return "empty"
        if not os.path.isfile(os.path.join(p, "zarr.json")):
            return "other"
    try:
        group = zarr.open_group(store=path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return "absent"
    except Exception:
        return "other"
    attrs = group.attrs.asdict()
    if ATTR in attrs:
        return "ntkdist"
    return "creating" if CREATING in attrs else "other"


class KernelStore:
    """One kernel job on disk: the kernel, its markers, and the job spec.

    Obtain one with :func:`ntkdist.open` (read-only) or through
    :func:`ntkdist.compute`. Attributes of the job come from the root
    attributes, written once by the coordinator before any tile.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from ntkdist._planner import Plan
        >>> p = Plan(n1=3, n2=3, out_dim=1, output="trace", symmetric=True, tile=2,
        ...          strategy="jacobian", dtype="float64")
        >>> path = os.path.join(tempfile.mkdtemp(), "k.zarr")
        >>> s = KernelStore.create(path, plan=p, spec=StoreSpec(p, {}, "x"))
        >>> s.progress(), s.kernel.shape
        ((0, 3), (3, 3))
    """

    def __init__(self, path: str, group: zarr.Group, *, read_only: bool) -> None:
        """Wrap an opened group (use :meth:`create` or :meth:`open`)."""
        self.path = path
        self._group = group
        self.read_only = read_only
        self._raw: dict[str, Any] = dict(group.attrs.asdict()[ATTR])
        self.spec = StoreSpec.from_json(self._raw)
        self.plan = self.spec.plan

    # -- creating and opening -------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        *,
        plan: Plan,
        spec: StoreSpec | dict[str, Any],
        inputs: dict[str, Any] | None = None,
    ) -> KernelStore:
        """Create the store's arrays and attributes (the coordinator, before work).

        Args:
            path: where; must be absent, an empty directory, or a store left
                half-created by a crash.
            plan: the tile plan (its tile sizes become the chunks).
            spec: the job spec for the root attributes (a dict is read as
                :meth:`StoreSpec.from_json` reads one); its plan becomes ``plan``.
            inputs: in-memory inputs to copy into ``inputs/<name>``, chunked by
                tile rows, so workers read them tile by tile.

        Raises:
            StoreError: the path cannot be written (read-only, not a directory).
        """
        if isinstance(spec, StoreSpec):
            spec = dataclasses.replace(spec, plan=plan)
        else:
            spec = StoreSpec.from_json({**spec, "plan": json_plan(plan)})
        state = store_state(path)
        if state == "creating":
            remove_store(path)
        elif state not in ("absent", "empty"):
            raise StoreError(
                f"refusing to create a store at {path}: it holds {state} data."
            )
        try:
            group = zarr.open_group(store=path, mode="w", attributes={CREATING: True})
            out_shape = kernel_shape(plan.output, plan.n1, plan.n2, plan.out_dim)
            chunks = (plan.tile_rows, plan.tile_cols, *out_shape[2:])
            group.create_array(
                "kernel",
                shape=out_shape,
                chunks=chunks,
                dtype=plan.dtype,
                fill_value=np.nan,
                compressors=KERNEL_COMPRESSORS,
                dimension_names=kernel_dims(plan.output),
            )
            group.create_array(
                "done",
                shape=plan.grid,
                chunks=(1, 1),
                dtype="uint64",
                fill_value=0,
                dimension_names=("tile1", "tile2"),
            )
            for name, x in (inputs or {}).items():
                _copy_input(
                    group, name, x, plan.tile_rows if name == "x1" else plan.tile_cols
                )
            group.attrs.put({ATTR: spec.to_json()})
        except PermissionError as err:
            raise StoreError(
                f"cannot write the store at {path} ({err.strerror or err}); the "
                "location is read-only for this user. Choose a writable path."
            ) from err
        except (NotADirectoryError, FileExistsError, IsADirectoryError) as err:
            raise StoreError(
                f"cannot create a store at {path}: {err}. Choose a path that is "
                "absent or an empty directory."
            ) from err
        except OSError as err:
            raise StoreError(f"cannot write the store at {path}: {err}.") from err
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, mode: str = "r") -> KernelStore:
        """Open an existing store, read-only (``"r"``) or for writing (``"r+"``).

        Raises:
            StoreError: nothing, or not an ntkdist store, is at ``path``.
        """
        path = os.fspath(path)
        state = store_state(path)
        if state != "ntkdist":
            what = {
                "absent": "nothing",
                "empty": "an empty directory",
                "creating": "a store whose creation did not finish",
                "other": "something that is not an ntkdist kernel store",
            }[state]
            raise StoreError(
                f"cannot open {path} as a kernel store: it holds {what}. Pass the "
                "path given as store= to ntkdist.compute (CLI: --out)."
            )
        group = zarr.open_group(store=path, mode="r" if mode == "r" else "r+")
        return cls(path, group, read_only=mode == "r")

    # -- the contract readers rely on ----------------------------------------

    @functools.cached_property
    def kernel(self) -> zarr.Array:
        """The kernel in its output form's shape; NaN where not yet written."""
        return self._group["kernel"]  # type: ignore[return-value]

    @functools.cached_property
    def done(self) -> zarr.Array:
        """Marker array: ``done[i, j]`` is block ``(i, j)``'s checksum, 0 if absent."""
        return self._group["done"]  # type: ignore[return-value]

    @property
    def attrs(self) -> dict[str, Any]:
        """The JSON job spec as stored (fields, fingerprint, plan, inputs, ...);
        ``.spec`` is the same, typed."""
        return dict(self._raw)

    @property
    def output(self) -> str:
        """``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``."""
        return self.plan.output

    @property
    def out_dim(self) -> int:
        """The model's number of outputs ``O``."""
        return self.plan.out_dim

    @property
    def n1(self) -> int:
        """Samples of ``x1``."""
        return self.plan.n1

    @property
    def n2(self) -> int:
        """Samples of ``x2`` (``n1`` when symmetric)."""
        return self.plan.n2

    @property
    def symmetric(self) -> bool:
        """Whether ``x2 = x1`` (only tiles ``i <= j`` are computed)."""
        return self.plan.symmetric

    @property
    def fields(self) -> dict[str, str]:
        """Fingerprint fields: name -> short hash."""
        return dict(self.spec.fields)

    @property
    def fingerprint(self) -> str:
        """The hash over all fingerprint fields."""
        return self.spec.fingerprint

    def markers(self) -> np.ndarray:
        """The marker array read whole: ``(grid1, grid2)`` uint64 checksums."""
        return np.asarray(self.done[...])

    def done_tiles(self, markers: np.ndarray | None = None) -> list[Tile]:
        """Plan tiles that have a marker."""
        m = self.markers() if markers is None else markers
        return [t for t in self.plan.tiles() if m[t.i, t.j] != 0]

    def todo(self) -> list[Tile]:
        """Plan tiles without a marker, in plan order: what a resume computes."""
        m = self.markers()
        return [t for t in self.plan.tiles() if m[t.i, t.j] == 0]

    def progress(self) -> tuple[int, int]:
        """``(tiles_done, tiles_total)``, counted from the markers."""
        return len(self.done_tiles()), self.plan.n_tiles

    @property
    def complete(self) -> bool:
        """Whether every tile of the plan has its marker."""
        done, total = self.progress()
        return done == total

    def to_dask(self) -> Any:
        """The kernel as a dask array whose chunks are the tiles."""
        import dask.array as da

        return da.from_zarr(self.kernel)

    def __repr__(self) -> str:
        """Short description with progress."""
        done, total = self.progress()
        return (
            f"KernelStore({self.path!r}, output={self.output!r}, "
            f"shape={self.kernel.shape}, tiles {done}/{total})"
        )

    # -- the coordinator's writes ---------------------------------------------

    def write_marker(self, tile: Tile, checksums: tuple[int, int]) -> None:
        """Record a finished tile: the mirror's checksum first, the tile's last."""
        if tile.kind == "mirror":
            self.done[tile.j, tile.i] = np.uint64(checksums[1])
        self.done[tile.i, tile.j] = np.uint64(checksums[0])

    def check_tiles(self) -> tuple[list[Tile], list[Tile]]:
        """Re-read every marked tile and compare checksums.

        Returns:
            ``(holes, corrupt)``: tiles without a marker or whose chunk (or
            mirror chunk) is gone (missing), and marked tiles whose data (or
            mirror) no longer matches its checksum or cannot be read.
        """
        m = self.markers()
        present = self._chunk_keys()
        tail = (0,) * (self.kernel.ndim - 2)
        holes, corrupt = [], []
        for t in self.plan.tiles():
            if m[t.i, t.j] == 0:
                holes.append(t)
                continue
            blocks = [((t.i, t.j), t.rows, t.cols)]
            if t.kind == "mirror":
                blocks.append(((t.j, t.i), t.cols, t.rows))
            if present is not None and any(
                self.kernel.metadata.encode_chunk_key((bi, bj, *tail)) not in present
                for (bi, bj), _, _ in blocks
            ):
                holes.append(t)
                continue
            for (bi, bj), (r0, r1), (c0, c1) in blocks:
                try:
                    ok = checksum(np.asarray(self.kernel[r0:r1, c0:c1])) == m[bi, bj]
                except Exception:
                    ok = False
                if not ok:
                    corrupt.append(t)
                    break
        return holes, corrupt

    def _chunk_keys(self) -> set[str] | None:
        """The kernel's stored chunk keys (relative to the array), if listable."""

        prefix = f"{self.kernel.path}/"  # read here: not inside the event loop
        store = self._group.store

        async def keys() -> set[str]:
            return {k[len(prefix) :] async for k in store.list_prefix(prefix)}

        try:
            return sync(keys())
        except Exception:
            return None

    def partial_files(self) -> list[str]:
        """Temporary files of chunk writes that never finished (a killed job).

        A chunk write (the direct writer's or zarr's own) goes to
        ``<chunk>.<id>.partial`` and is renamed into place when whole; one
        killed mid-write leaves that file behind. Only local stores have them.
        """
        if is_url(self.path):
            return []
        root = _local(self.path)
        found = []
        for here, _, files in os.walk(root):
            found += [os.path.join(here, f) for f in files if f.endswith(".partial")]
        return sorted(found)

    def remove_partial_files(self) -> list[str]:
        """Delete :meth:`partial_files` (lock held); return the files removed."""
        gone = []
        for f in self.partial_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
                gone.append(f)
        return gone

    def clear_tiles(self, tiles: Iterable[Tile]) -> None:
        """Delete the markers and chunks of ``tiles`` so they are recomputed."""
        kernel = self.kernel
        tail = (0,) * (kernel.ndim - 2)
        keys = []
        for t in tiles:
            self.done[t.i, t.j] = np.uint64(0)
            pairs = [(t.i, t.j)] + ([(t.j, t.i)] if t.kind == "mirror" else [])
            for bi, bj in pairs:
                self.done[bi, bj] = np.uint64(0)
                keys.append(
                    f"{kernel.path}/"
                    + kernel.metadata.encode_chunk_key((bi, bj, *tail))
                )
        store = self._group.store
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                sync(store.delete(key))


def json_plan(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict."""
    import json

    return dict(json.loads(plan.to_json()))


def _copy_input(group: zarr.Group, name: str, x: Any, rows: int) -> None:
    shape = tuple(int(s) for s in x.shape)
    arr = group.create_array(
        f"inputs/{name}",
        shape=shape,
        chunks=(rows, *shape[1:]),
        dtype=np.dtype(x.dtype),
        dimension_names=(name, *(f"{name}_feature_{k}" for k in range(len(shape) - 1))),
    )
    for start in range(0, shape[0], rows):
        block = x[start : start + rows]
        if hasattr(block, "compute"):
            block = block.compute()
        arr[start : start + len(block)] = np.asarray(block)


def remove_store(path: str) -> None:
    """Delete a store (local directory, or every key under a URL)."""
    if not is_url(path):
        shutil.rmtree(_local(path))
        return
    group = zarr.open_group(store=path, mode="r+")
    sync(group.store.delete_dir(""))
