"""KernelStore: layout, markers, checksums, verification and the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from ntkdist import StoreError, StoreLockedError
from ntkdist._planner import Plan
from ntkdist.storage import KernelStore, StoreLock, lock_path, store_state, write_tile


def _plan(output="full", symmetric=True, n1=5, n2=5, tile=2, out_dim=2):
    return Plan(
        n1=n1,
        n2=n2 if not symmetric else n1,
        out_dim=out_dim,
        output=output,
        symmetric=symmetric,
        tile=tile,
        strategy="jacobian",
        dtype="float64",
    )


def _spec():
    return {"fields": {"model": "m", "params": "p"}, "fingerprint": "f" * 32}


def _fill(store, rng):
    """Write every tile with random data; return the dense array written."""
    dense = np.full(store.kernel.shape, np.nan)
    for t in store.plan.tiles():
        block = rng.normal(
            size=store.kernel[t.rows[0] : t.rows[1], t.cols[0] : t.cols[1]].shape
        )
        if t.kind == "diagonal" and store.output == "full":
            block = (block + block.transpose(1, 0, 3, 2)) / 2
        cs = write_tile(store.kernel, t, block, store.output)
        store.write_marker(t, cs)
        dense[t.rows[0] : t.rows[1], t.cols[0] : t.cols[1]] = block
        if t.kind == "mirror":
            dense[t.cols[0] : t.cols[1], t.rows[0] : t.rows[1]] = block.transpose(
                1, 0, 3, 2
            )
    return dense


def test_layout_chunks_are_tiles_with_nan_fill(tmp_path):
    s = KernelStore.create(str(tmp_path / "k.zarr"), plan=_plan(), spec=_spec())
    assert s.kernel.shape == (5, 5, 2, 2)
    assert s.kernel.chunks == (2, 2, 2, 2)
    assert np.isnan(s.kernel[...]).all()
    assert s.done.shape == (3, 3) and s.done.chunks == (1, 1)
    assert s.progress() == (0, 6)
    assert not s.complete
    ro = KernelStore.open(str(tmp_path / "k.zarr"))
    assert ro.read_only and ro.attrs["fingerprint"] == "f" * 32
    assert Plan.from_json(ro.attrs["plan"]) == _plan()


def test_symmetric_writes_mirror_and_markers_record_completion(tmp_path):
    s = KernelStore.create(str(tmp_path / "k.zarr"), plan=_plan(), spec=_spec())
    dense = _fill(s, np.random.default_rng(0))
    assert s.complete and s.progress() == (6, 6)
    got = s.kernel[...]
    np.testing.assert_array_equal(got, dense)
    np.testing.assert_array_equal(got, got.transpose(1, 0, 3, 2))
    assert s.check_tiles() == ([], [])
    np.testing.assert_array_equal(s.to_dask().compute(), dense)


def test_check_tiles_finds_truncated_altered_and_missing_chunks(tmp_path):
    path = tmp_path / "k.zarr"
    s = KernelStore.create(str(path), plan=_plan(output="trace"), spec=_spec())
    _fill_trace(s)
    truncated = path / "kernel" / "c" / "0" / "1"
    truncated.write_bytes(truncated.read_bytes()[:5])
    (path / "kernel" / "c" / "2" / "2").unlink()
    # Block (2, 0) is the mirror written by tile (0, 2).
    other = KernelStore.create(
        str(tmp_path / "o.zarr"), plan=_plan(output="trace"), spec=_spec()
    )
    _fill_trace(other, seed=1)
    (path / "kernel" / "c" / "2" / "0").write_bytes(
        (tmp_path / "o.zarr" / "kernel" / "c" / "2" / "0").read_bytes()
    )
    holes, corrupt = s.check_tiles()
    assert [t.key for t in holes] == ["2.2"]  # deleted: missing, not corrupt
    assert sorted(t.key for t in corrupt) == ["0.1", "0.2"]
    s.clear_tiles(holes + corrupt)
    assert sorted(t.key for t in s.todo()) == ["0.1", "0.2", "2.2"]
    assert not truncated.exists()


def _fill_trace(s, seed=0):
    rng = np.random.default_rng(seed)
    for t in s.plan.tiles():
        block = rng.normal(size=t.shape)
        if t.kind == "diagonal":
            block = (block + block.T) / 2
        s.write_marker(t, write_tile(s.kernel, t, block, "trace"))


def test_rectangular_ragged_tiles(tmp_path):
    plan = _plan(output="diagonal", symmetric=False, n1=7, n2=3, tile=4)
    s = KernelStore.create(str(tmp_path / "k.zarr"), plan=plan, spec=_spec())
    assert s.kernel.chunks == (4, 3, 2)
    rng = np.random.default_rng(0)
    for t in plan.tiles():
        s.write_marker(
            t, write_tile(s.kernel, t, rng.normal(size=(*t.shape, 2)), "diagonal")
        )
    assert s.complete and s.check_tiles() == ([], [])
    assert not np.isnan(s.kernel[...]).any()


@pytest.mark.parametrize(
    "output,symmetric,n1,n2,tile,out_dim",
    [
        ("full", True, 50, 50, 20, 3),  # ragged, mirrors, pieces split rows
        ("full", False, 45, 70, 32, 3),  # ragged rows and columns
        ("diagonal", True, 33, 33, 16, 4),
        ("trace", False, 700, 1300, 600, 1),  # a row spans two pieces
    ],
)
def test_direct_chunk_writes_are_zarrs_bytes(
    tmp_path, monkeypatch, output, symmetric, n1, n2, tile, out_dim
):
    """Chunk files written directly hold exactly what zarr writes, same checksums."""
    from ntkdist.storage import _direct

    plan = _plan(output, symmetric, n1, n2, tile, out_dim)
    stores, sums = [], []
    for direct in (False, True):
        # Direct writes for every chunk, through pieces of one aligned block,
        # so that ragged bands, several pieces per chunk and an unaligned
        # tail all occur at these small sizes.
        monkeypatch.setattr(_direct, "DIRECT_MIN_BYTES", 0 if direct else 1 << 62)
        monkeypatch.setattr(_direct, "_PIECE", 4096)
        s = KernelStore.create(
            str(tmp_path / f"{direct}.zarr"), plan=plan, spec=_spec()
        )
        kernel = zarr.open_array(
            store=s.path, path="kernel", mode="r+", config={"write_empty_chunks": True}
        )
        assert (
            _direct.chunk_path(kernel, 0, 0, np.empty(kernel.chunks)) is not None
        ) == direct
        rng = np.random.default_rng(0)
        got = []
        for t in plan.tiles():
            shape = {"full": (out_dim, out_dim), "diagonal": (out_dim,)}.get(output, ())
            got.append(
                write_tile(kernel, t, rng.normal(size=(*t.shape, *shape)), output)
            )
            s.write_marker(t, got[-1])
        stores.append(tmp_path / f"{direct}.zarr" / "kernel")
        sums.append(got)
        assert s.complete and s.check_tiles() == ([], [])
    assert sums[0] == sums[1]
    files = [
        sorted(p.relative_to(d) for d in [d] for p in d.rglob("*") if p.is_file())
        for d in stores
    ]
    assert files[0] == files[1]
    assert len(files[0]) == plan.grid[0] * plan.grid[1] + 1  # chunks, zarr.json
    for f in files[0]:
        assert (stores[0] / f).read_bytes() == (stores[1] / f).read_bytes(), f
    # A truncated direct-written chunk is found.
    chunk = next(p for p in stores[1].rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(chunk.read_bytes()[:-8])
    assert KernelStore.open(str(stores[1].parent)).check_tiles()[1]


def test_open_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an ntkdist kernel store"):
        KernelStore.open(str(tmp_path / "junk"))
    with pytest.raises(StoreError, match="holds nothing"):
        KernelStore.open(str(tmp_path / "absent"))
    with pytest.raises(StoreError, match="holds other"):
        KernelStore.create(str(tmp_path / "junk"), plan=_plan(), spec=_spec())
    assert (tmp_path / "junk" / "data.txt").read_text() == "mine"
    assert store_state(str(tmp_path / "junk")) == "other"


def test_lock_refuses_a_second_live_job(tmp_path):
    store = str(tmp_path / "k.zarr")
    with (
        StoreLock(store),
        pytest.raises(StoreLockedError, match="being written by another job"),
    ):
        StoreLock(store).acquire()
    assert not os.path.exists(lock_path(store))
    with StoreLock(store):  # released: free again
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    store = str(tmp_path / "k.zarr")
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(proc.stdout)
    with open(lock_path(store), "w") as f:
        json.dump(
            {
                "pid": dead,
                "host": socket.gethostname(),
                "token": "x",
                "heartbeat": time.time(),
            },
            f,
        )
    with StoreLock(store) as lock, open(lock.path) as f:
        assert json.load(f)["pid"] == os.getpid()


def test_lock_with_an_old_heartbeat_is_stale(tmp_path):
    store = str(tmp_path / "k.zarr")
    with open(lock_path(store), "w") as f:
        json.dump(
            {
                "pid": 1,
                "host": "elsewhere",
                "token": "x",
                "heartbeat": time.time() - 3600,
            },
            f,
        )
    with StoreLock(store, stale_seconds=60):
        pass
    with open(lock_path(store), "w") as f:
        json.dump(
            {"pid": 1, "host": "elsewhere", "token": "x", "heartbeat": time.time()}, f
        )
    with pytest.raises(StoreLockedError, match="elsewhere"):
        StoreLock(store).acquire()


def test_lock_heartbeat_advances(tmp_path):
    store = str(tmp_path / "k.zarr")
    with StoreLock(store, heartbeat_seconds=0.05) as lock:
        with open(lock.path) as f:
            first = json.load(f)["heartbeat"]
        time.sleep(0.3)
        with open(lock.path) as f:
            assert json.load(f)["heartbeat"] > first


# -- the job spec ------------------------------------------------------------------


def test_store_spec_round_trips_and_keeps_unknown_keys():
    from ntkdist.storage import InputRecord, StoreSpec

    spec = StoreSpec(
        plan=_plan(),
        fields={"model": "m"},
        fingerprint="f",
        inputs={"x1": InputRecord("", "inputs/x1", (5, 3), "float64"), "x2": None},
        extra={"written_by_a_later_version": [1, 2]},
    )
    data = json.loads(json.dumps(spec.to_json()))
    assert StoreSpec.from_json(data) == spec
    assert data["written_by_a_later_version"] == [1, 2]
    assert data["tile"] == [2, 2] and data["output"] == "full"


def test_a_store_written_before_later_keys_opens_and_resumes(tmp_path):
    """Stores whose job spec lacks keys added since (``precision``) still open,
    read as what the missing key meant, and resume."""
    import ntkdist

    from .engine import make_params, mlp

    p, x = make_params(), np.random.default_rng(0).normal(size=(9, 4))
    path = tmp_path / "k.zarr"
    kw = {"output": "trace", "tile": 4, "executor": "serial", "progress": False}
    s = ntkdist.compute(mlp, p, x, store=path, precision="default", **kw)
    done = s.kernel[...]
    writable = KernelStore.open(path, mode="r+")
    writable.clear_tiles(writable.plan.tiles()[1:3])
    group = zarr.open_group(str(path), mode="r+")
    old = dict(group.attrs["ntkdist"])
    for key in ("precision", "model_name", "versions", "created", "conventions"):
        del old[key]
    group.attrs["ntkdist"] = old
    reopened = ntkdist.open(path)
    assert reopened.spec.precision == "default" and "precision" not in reopened.attrs
    assert reopened.progress() == (reopened.plan.n_tiles - 2, reopened.plan.n_tiles)
    s = ntkdist.compute(mlp, p, x, store=path, precision="default", **kw)
    assert s.complete
    np.testing.assert_array_equal(s.kernel[...], done)


def test_factor_blocks_written_leaf_by_leaf_are_zarrs_bytes(tmp_path, monkeypatch):
    """A block's factor leaves go straight to their chunk file, one after another
    (no joined copy): the same file, checksum and read-back as through zarr."""
    from ntkdist.storage import _direct
    from ntkdist.storage._direct import checksum
    from ntkdist.storage._factors import (
        FACTOR_GROUP,
        create_factor_store,
        read_factors,
        write_factors,
    )

    rng = np.random.default_rng(0)
    # float64 leaves of odd sizes, some not contiguous, stored as float32: a
    # leaf spans pieces, and pieces end inside leaves.
    leaves = [
        rng.normal(size=(3, 1001)),
        rng.normal(size=(7, 5)).T,
        np.arange(4099, dtype=np.float32),
    ]
    items = sum(v.size for v in leaves)
    joined = np.concatenate([np.asarray(v, np.float32).ravel() for v in leaves])
    files, sums, joins = [], [], []
    write_joined = _direct.write_joined_file
    monkeypatch.setattr(
        _direct,
        "write_joined_file",
        lambda *a: joins.append(1) or write_joined(*a),
    )
    for direct in (False, True):
        monkeypatch.setattr(_direct, "DIRECT_MIN_BYTES", 0 if direct else 1 << 62)
        monkeypatch.setattr(_direct, "_PIECE", 4096)
        root = str(tmp_path / f"{direct}.zarr")
        zarr.open_group(root, mode="w")
        create_factor_store(root, "x1", 3, items, "float32")
        write_factors(root, "x1", 1, leaves)
        got = read_factors(root, "x1", 1)
        np.testing.assert_array_equal(got, joined)
        assert read_factors(root, "x1", 0) is None  # not written: absent
        chunk = tmp_path / f"{direct}.zarr" / FACTOR_GROUP / "x1" / "c" / "1" / "0"
        files.append(chunk.read_bytes())
        done = zarr.open_array(root, path=f"{FACTOR_GROUP}/x1_done", mode="r")
        sums.append(int(done[1]))
        assert len(joins) == int(direct)  # the direct case took the direct path
    assert files[0] == files[1] == joined.tobytes()
    assert sums[0] == sums[1] == checksum(joined)
