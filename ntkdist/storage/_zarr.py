"""KernelStore: the Zarr v3 layout of one kernel job, its markers and checksums.

Layout of a store (a Zarr v3 group)::

    zarr.json              root attributes {"ntkdist": job spec} (coordinator only)
    kernel/                the kernel, chunks = one tile along both sample axes,
                           the O×O axes whole; fill NaN
    done/                  uint64 (grid1, grid2), chunks (1, 1): done[i, j] is the
                           checksum of kernel block (i, j), written after its data;
                           a tile's marker is done[i, j] of the tile it names
    inputs/x1, inputs/x2   copies of in-memory inputs, chunked by tile rows

The ``kernel`` chunk of block ``(i, j)`` has exactly one writer: the task of
tile ``(i, j)``, or for ``j < i`` in a symmetric job the task of ``(j, i)``,
which writes its transpose.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import mmap
import os
import shutil
import threading
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BytesCodec
from zarr.core.sync import sync

from .._errors import StoreError
from .._planner import Plan, Tile

FORMAT = "ntkdist-kernel-store/1"
ATTR = "ntkdist"
CREATING = "ntkdist_creating"

# Kernel chunks are stored uncompressed: kernel values compress by 3-16 %
# (zstd, blosc-lz4 with shuffle) while compressing a tile took longer than
# computing it (80 MiB tile: zstd 1.6 s, blosc 0.6 s, none 0.1 s).
KERNEL_COMPRESSORS = None

StoreState = Literal["absent", "empty", "creating", "ntkdist", "other"]


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ``file://``, ...)."""
    return "://" in path


def checksum(block: np.ndarray) -> int:
    """A nonzero 64-bit checksum of an array's C-order bytes: length and CRC-32.

    Fast (several GB/s, no copy) so it adds little to a tile's write; it
    detects truncated, altered or swapped chunks, not deliberate tampering.

    Example:
        >>> checksum(np.zeros(3)) == checksum(np.zeros(3)) != checksum(np.ones(3))
        True
    """
    raw = memoryview(np.ascontiguousarray(block)).cast("B")
    return (((raw.nbytes & 0xFFFFFFFF) << 32) | zlib.crc32(raw)) or 1


def mirror_block(block: np.ndarray, output: str) -> np.ndarray:
    """Block ``(j, i)`` from block ``(i, j)``: ``Θ[j, i, b, a] = Θ[i, j, a, b]``."""
    return np.ascontiguousarray(_mirror_view(block, output))


def _mirror_view(block: np.ndarray, output: str) -> np.ndarray:
    axes = {"full": (1, 0, 3, 2), "diagonal": (1, 0, 2)}.get(output, (1, 0))
    return block.transpose(axes)


def write_tile(
    kernel: zarr.Array, tile: Tile, block: np.ndarray, output: str
) -> tuple[int, int]:
    """Write one tile (and its mirror) into ``kernel``; return their checksums.

    The second checksum is 0 unless the tile is a symmetric job's ``mirror``
    tile. Called by tasks; touches no attributes and no markers. When it
    returns, the data is in the chunk files (see :func:`write_chunk_file`).
    """
    block = np.asarray(block, dtype=kernel.dtype)
    (r0, _), (c0, _) = tile.rows, tile.cols
    first = _write_block(kernel, r0, c0, block)
    if tile.kind != "mirror":
        return first, 0
    return first, _write_block(kernel, c0, r0, _mirror_view(block, output))


# Chunks of at least this many bytes in a local store are written by
# write_chunk_file rather than through zarr. Writing a 166 MB chunk through the
# page cache cost 0.3-0.35 s of system time (a page-cache page is fresh memory
# for every byte of a new file); with O_DIRECT it took 0.02 s of system time
# and 0.08 s on the wire, and the kernel's chunks no longer push other data
# out of the page cache. Smaller chunks take zarr's path.
DIRECT_MIN_BYTES = 8 << 20
# The bytes of a chunk go to the file in pieces of this size through two
# reused, page-aligned buffers: one is written while the next is filled.
_PIECE = 8 << 20
_ALIGN = 4096
_buffers = threading.local()


def _write_block(kernel: zarr.Array, r0: int, c0: int, block: np.ndarray) -> int:
    """Write ``block`` at rows ``r0``, columns ``c0``; return its checksum."""
    path = _chunk_path(kernel, r0, c0, block)
    if path is None:
        block = np.ascontiguousarray(block)
        kernel[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
        return checksum(block)
    return write_chunk_file(path, block, kernel.chunks, kernel.fill_value)


def _chunk_path(kernel: zarr.Array, r0: int, c0: int, block: np.ndarray) -> str | None:
    """The file of the chunk ``block`` fills, if write_chunk_file may write it.

    That is: a local store, chunks stored as plain bytes (no compressor, no
    sharding) in native byte order, a block that starts at a chunk's corner
    and fits in it, and a chunk of at least ``DIRECT_MIN_BYTES``.
    """
    chunks = kernel.chunks
    nbytes = int(np.prod(chunks)) * kernel.dtype.itemsize
    store = kernel.store
    if (
        nbytes < DIRECT_MIN_BYTES
        or not isinstance(store, zarr.storage.LocalStore)
        or getattr(store, "read_only", False)
        or kernel.metadata.zarr_format != 3
        or len(kernel.metadata.codecs) != 1
        or not isinstance(kernel.metadata.codecs[0], BytesCodec)
        or not _same_order(kernel.dtype, kernel.metadata.codecs[0].endian)
        or block.shape[2:] != chunks[2:]
        or tuple(kernel.shape[2:]) != tuple(chunks[2:])
        or r0 % chunks[0]
        or c0 % chunks[1]
        or not 0 < block.shape[0] <= chunks[0]
        or not 0 < block.shape[1] <= chunks[1]
        or r0 + block.shape[0] > kernel.shape[0]
        or c0 + block.shape[1] > kernel.shape[1]
    ):
        return None
    coords = (r0 // chunks[0], c0 // chunks[1], *(0,) * (kernel.ndim - 2))
    key = kernel.metadata.encode_chunk_key(coords)
    return os.path.join(str(store.root), *kernel.path.split("/"), *key.split("/"))


def _same_order(dtype: np.dtype[Any], endian: str | None) -> bool:
    """Whether arrays of ``dtype`` hold their bytes in the codec's byte order."""
    if endian is None or dtype.itemsize == 1:
        return True
    return dtype == dtype.newbyteorder("<" if endian == "little" else ">")


def write_chunk_file(
    path: str, block: np.ndarray, chunk_shape: tuple[int, ...], fill: Any
) -> int:
    """Write a chunk file as zarr would, from a block at the chunk's corner.

    The file holds the chunk's C-order bytes: ``block`` in its corner, ``fill``
    elsewhere (the ragged edge), as zarr writes an uncompressed chunk. It is
    written to a temporary name and renamed into place, so readers see the
    whole chunk or none of it; when this returns, the data is in the file.
    The checksum of ``block`` (:func:`checksum`) is computed on the way.

    Returns:
        ``checksum(block)``.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        try:
            crc = _write_file(tmp, block, chunk_shape, fill, direct=True)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            # The file system takes no O_DIRECT (tmpfs, some network ones).
            os.unlink(tmp)
            crc = _write_file(tmp, block, chunk_shape, fill, direct=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    nbytes = block.size * block.itemsize
    return (((nbytes & 0xFFFFFFFF) << 32) | crc) or 1


def _write_file(
    path: str,
    block: np.ndarray,
    chunk_shape: tuple[int, ...],
    fill: Any,
    *,
    direct: bool,
) -> int:
    """Write the chunk's bytes to a new file ``path``; return the block's CRC-32."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct_flag = getattr(os, "O_DIRECT", 0) if direct else 0
    fd = os.open(path, flags | direct_flag, 0o666)
    try:
        bufs = _aligned_buffers()
        pool = ThreadPoolExecutor(1)
        try:
            out = _Out(fd, bufs, pool, direct_flag)
            crc = 0
            for piece, data in _pieces(block, chunk_shape, fill):
                for d in data:
                    crc = zlib.crc32(d, crc)
                out.write(piece)
            out.close()
        finally:
            pool.shutdown(wait=True)
    finally:
        os.close(fd)
    return crc


def _aligned_buffers() -> list[np.ndarray]:
    """This thread's two page-aligned ``_PIECE``-byte buffers (kept for reuse)."""
    bufs = getattr(_buffers, "bufs", None)
    if bufs is None or len(bufs[0]) < _PIECE:
        maps = [mmap.mmap(-1, _PIECE) for _ in range(2)]
        bufs = [np.frombuffer(m, dtype=np.uint8) for m in maps]
        _buffers.bufs = bufs
    return bufs


class _Out:
    """A file's bytes in order, written in aligned ``_PIECE`` pieces by a thread."""

    def __init__(
        self, fd: int, bufs: list[np.ndarray], pool: ThreadPoolExecutor, direct: int
    ) -> None:
        self.fd, self.bufs, self.pool, self.direct = fd, bufs, pool, direct
        self.k = 0  # the buffer being filled
        self.used = 0  # its bytes filled
        self.busy: list[Future[None] | None] = [None, None]

    def write(self, data: memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        while len(src):
            if self.used == 0:
                self._wait(self.k)
            n = min(len(src), _PIECE - self.used)
            self.bufs[self.k][self.used : self.used + n] = src[:n]
            self.used += n
            src = src[n:]
            if self.used == _PIECE:
                self._flush(_PIECE)

    def close(self) -> None:
        whole = self.used - self.used % _ALIGN
        tail = self.bufs[self.k][whole : self.used]
        if whole:
            self._flush(whole)
        for k in (0, 1):
            self._wait(k)
        if len(tail):
            if self.direct:  # the last bytes are no whole block: write them buffered
                fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~self.direct)
            _write_all(self.fd, memoryview(tail))

    def _flush(self, n: int) -> None:
        view = memoryview(self.bufs[self.k])[:n]
        self.busy[self.k] = self.pool.submit(_write_all, self.fd, view)
        self.k, self.used = 1 - self.k, 0

    def _wait(self, k: int) -> None:
        fut, self.busy[k] = self.busy[k], None
        if fut is not None:
            fut.result()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def _pieces(
    block: np.ndarray, chunk_shape: tuple[int, ...], fill: Any
) -> Iterator[tuple[memoryview, list[memoryview]]]:
    """The chunk's C-order bytes in pieces, each with the block's bytes in it.

    A C-contiguous block as wide as the chunk is its own bytes (no copy);
    otherwise bands of chunk rows are assembled, padded with ``fill``.
    """
    rows, cols = block.shape[:2]
    row_bytes = int(np.prod(chunk_shape[1:])) * block.itemsize
    band = max(1, _PIECE // row_bytes)
    if cols == chunk_shape[1] and block.flags.c_contiguous:
        raw = memoryview(block).cast("B")
        for a in range(0, rows, band):
            piece = raw[a * row_bytes : min(rows, a + band) * row_bytes]
            yield piece, [piece]
        if rows < chunk_shape[0]:
            pad = np.full(
                (min(band, chunk_shape[0] - rows), *chunk_shape[1:]),
                fill,
                dtype=block.dtype,
            )
            for a in range(rows, chunk_shape[0], band):
                n = min(band, chunk_shape[0] - a)
                yield memoryview(pad[:n]).cast("B"), []
        return
    buf = np.empty((band, *chunk_shape[1:]), dtype=block.dtype)
    for a in range(0, chunk_shape[0], band):
        n = min(band, chunk_shape[0] - a)
        v = max(0, min(n, rows - a))  # rows of the block in this band
        out = buf[:n]
        out[:v, :cols] = block[a : a + v]
        out[:v, cols:] = fill
        out[v:] = fill
        if cols == chunk_shape[1]:
            data = [memoryview(out[:v]).cast("B")] if v else []
        else:
            data = [memoryview(out[i, :cols]).cast("B") for i in range(v)]
        yield memoryview(out).cast("B"), data


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
        >>> spec = {"fields": {}, "fingerprint": "x"}
        >>> s = KernelStore.create(path, plan=p, spec=spec)
        >>> s.progress(), s.kernel.shape
        ((0, 3), (3, 3))
    """

    def __init__(self, path: str, group: zarr.Group, *, read_only: bool) -> None:
        """Wrap an opened group (use :meth:`create` or :meth:`open`)."""
        self.path = path
        self._group = group
        self.read_only = read_only
        self._spec: dict[str, Any] = dict(group.attrs.asdict()[ATTR])
        self.plan = Plan.from_json(self._spec["plan"])

    # -- creating and opening -------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        *,
        plan: Plan,
        spec: dict[str, Any],
        inputs: dict[str, Any] | None = None,
    ) -> KernelStore:
        """Create the store's arrays and attributes (the coordinator, before work).

        Args:
            path: where; must be absent, an empty directory, or a store left
                half-created by a crash.
            plan: the tile plan (its tile sizes become the chunks).
            spec: the job spec for the root attributes (fields, fingerprint, ...).
            inputs: in-memory inputs to copy into ``inputs/<name>``, chunked by
                tile rows, so workers read them tile by tile.

        Raises:
            StoreError: the path cannot be written (read-only, not a directory).
        """
        state = store_state(path)
        if state == "creating":
            remove_store(path)
        elif state not in ("absent", "empty"):
            raise StoreError(
                f"refusing to create a store at {path}: it holds {state} data."
            )
        try:
            group = zarr.open_group(store=path, mode="w", attributes={CREATING: True})
            out_shape = _kernel_shape(plan)
            chunks = (plan.tile_rows, plan.tile_cols, *out_shape[2:])
            group.create_array(
                "kernel",
                shape=out_shape,
                chunks=chunks,
                dtype=plan.dtype,
                fill_value=np.nan,
                compressors=KERNEL_COMPRESSORS,
            )
            group.create_array(
                "done", shape=plan.grid, chunks=(1, 1), dtype="uint64", fill_value=0
            )
            for name, x in (inputs or {}).items():
                _copy_input(
                    group, name, x, plan.tile_rows if name == "x1" else plan.tile_cols
                )
            full = {"format": FORMAT, **spec, "plan": json_plan(plan)}
            group.attrs.put({ATTR: full})
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
        """The JSON job spec (fields, fingerprint, plan, inputs, model spec, ...)."""
        return dict(self._spec)

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
        return dict(self._spec.get("fields", {}))

    @property
    def fingerprint(self) -> str:
        """The hash over all fingerprint fields."""
        return str(self._spec.get("fingerprint", ""))

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
            ``(holes, corrupt)``: tiles without a marker, and marked tiles whose
            data (or mirror) no longer matches its checksum or cannot be read.
        """
        m = self.markers()
        holes, corrupt = [], []
        for t in self.plan.tiles():
            if m[t.i, t.j] == 0:
                holes.append(t)
                continue
            blocks = [((t.i, t.j), t.rows, t.cols)]
            if t.kind == "mirror":
                blocks.append(((t.j, t.i), t.cols, t.rows))
            for (bi, bj), (r0, r1), (c0, c1) in blocks:
                try:
                    ok = checksum(np.asarray(self.kernel[r0:r1, c0:c1])) == m[bi, bj]
                except Exception:
                    ok = False
                if not ok:
                    corrupt.append(t)
                    break
        return holes, corrupt

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
            sync(store.delete(key))


def json_plan(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict."""
    import json

    return dict(json.loads(plan.to_json()))


def _kernel_shape(plan: Plan) -> tuple[int, ...]:
    o = plan.out_dim
    return {"full": (plan.n1, plan.n2, o, o), "diagonal": (plan.n1, plan.n2, o)}.get(
        plan.output, (plan.n1, plan.n2)
    )


def _copy_input(group: zarr.Group, name: str, x: Any, rows: int) -> None:
    shape = tuple(int(s) for s in x.shape)
    arr = group.create_array(
        f"inputs/{name}",
        shape=shape,
        chunks=(rows, *shape[1:]),
        dtype=np.dtype(x.dtype),
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
