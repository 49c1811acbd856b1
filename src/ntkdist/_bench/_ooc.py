"""Benchmark section ``ooc``: an out-of-core trace kernel, killed and resumed.

The job runs through the command line (``ntkdist compute``) in its own
process group. Once ``--kill-at`` of its tiles are recorded, the whole group
(the CLI, the scheduler in it, the nannies and the workers) is killed with
SIGKILL; the same command then runs again and resumes. Every ~0.25 s the
summed resident memory (RSS) of the CLI and all its descendants is sampled,
with each process's own peak (``VmHWM``; their sum bounds the peak that
sampling may miss). Summed RSS counts pages shared
between processes (libraries) once per process: it overstates the memory the
job really holds.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._planner import Plan, format_bytes
from ._kernel import store_bytes

# The goal: peak summed resident memory of the job under this.
MEMORY_GOAL = 4 * 2**30
SAMPLE_INTERVAL = 0.25
# Tolerance of the tiles checked against ntkdist.ntk (float32).
RTOL = 1e-4
# Samples of each checked tile compared with strategy="jacobian" too.
JACOBIAN_CHECK = 256

MODEL_FILE = """\
from ntkdist._bench._ooc import small_mlp


def factory():
    return small_mlp(d_in={d_in}, width={width}, depth={depth}, out={out})
"""


def _apply(params: Any, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def small_mlp(
    d_in: int = 32, width: int = 64, depth: int = 2, out: int = 10, seed: int = 0
) -> tuple[Callable[..., Any], Any]:
    """A float32 ReLU MLP: ``(apply_fn, params)`` with numpy params."""
    rng = np.random.default_rng(seed)
    dims = [d_in] + [width] * depth + [out]
    params = [
        (
            (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
            (0.1 * rng.normal(size=b)).astype(np.float32),
        )
        for a, b in itertools.pairwise(dims)
    ]
    return _apply, params


def factory() -> tuple[Callable[..., Any], Any]:
    """The ooc section's default model, for ``ntkdist compute``: 32→64→64→10."""
    return small_mlp()


# -- watching a process tree -----------------------------------------------------


def _hwm(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeWatch:
    """Samples the summed RSS of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        """Watch the tree rooted at ``pid``."""
        import psutil

        self.root = psutil.Process(pid)
        self.seen: dict[int, Any] = {pid: self.root}
        self.peak_rss = 0
        self.peak_processes = 0
        self.hwm: dict[int, int] = {}
        self.samples = 0

    def sample(self) -> None:
        """One sample: the tree's summed RSS and each process's ``VmHWM``."""
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            self.seen.setdefault(p.pid, p)
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
            self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), _hwm(p.pid))
        self.samples += 1
        self.peak_processes = max(self.peak_processes, len(procs))
        self.peak_rss = max(self.peak_rss, total)

    def alive(self) -> list[int]:
        """Processes of the tree seen so far that still run (not zombies)."""
        import psutil

        out = []
        for pid, p in self.seen.items():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                continue
        return out

    def figures(self) -> dict[str, Any]:
        """Peak summed RSS, the largest per-process ``VmHWM``, processes seen."""
        return {
            "peak_rss_sum": self.peak_rss,
            "max_process_hwm": max(self.hwm.values(), default=0),
            # an upper bound of the peak sum, which sampling may miss
            "sum_process_hwm": sum(self.hwm.values()),
            "processes_seen": len(self.seen),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
        }


def _progress(path: str) -> tuple[int, int] | None:
    import ntkdist

    try:
        return ntkdist.open(path).progress()
    except Exception:
        return None  # not created yet, or being created


def run_watched(
    cmd: list[str],
    store: str,
    log_path: str,
    *,
    kill_at: float | None = None,
    timeout: float = 24 * 3600,
) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, sampling its memory.

    With ``kill_at``, the group is killed with SIGKILL once that fraction of
    the store's tiles is recorded.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        watch = TreeWatch(proc.pid)
        killed, at_kill, last_poll = False, None, 0.0
        while proc.poll() is None:
            watch.sample()
            now = time.perf_counter()
            if kill_at is not None and now - last_poll >= SAMPLE_INTERVAL:
                last_poll = now
                prog = _progress(store)
                if prog and prog[0] >= max(1, math.ceil(kill_at * prog[1])):
                    watch.sample()
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed, at_kill = True, prog
                    break
            if now - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{cmd} ran past {timeout} s")
            time.sleep(SAMPLE_INTERVAL)
        seconds = time.perf_counter() - t0
    survivors = []
    if killed:
        deadline = time.monotonic() + 10
        while watch.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = watch.alive()
        for pid in survivors:  # left the group: killed one by one, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with open(log_path) as f:
        text = f.read()
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "killed": killed,
        "progress_at_kill": at_kill,
        "survivors_of_kill": survivors,
        "log_head": text[:2000],
        "log_tail": text[-2000:],
        **watch.figures(),
    }


# -- the section -------------------------------------------------------------------


def run_ooc(
    rate: float,
    *,
    n: int = 100_000,
    d_in: int = 32,
    width: int = 64,
    depth: int = 2,
    out: int = 10,
    tile: int | None = 2048,
    memory_budget: str | None = "1GiB",
    workers: int | None = None,
    executor: str = "dask",
    kill_at: float = 0.3,
    check_tiles: int = 3,
    verify_checksums: bool = False,
    keep: bool = False,
    scratch: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compute a symmetric trace kernel through the CLI, kill it, resume it."""
    import ntkdist

    tmp = tempfile.mkdtemp(prefix="ntkdist-bench-ooc-", dir=scratch)
    store = os.path.join(tmp, "trace.zarr")
    try:
        model_py = os.path.join(tmp, "model.py")
        with open(model_py, "w") as f:
            f.write(MODEL_FILE.format(d_in=d_in, width=width, depth=depth, out=out))
        x = np.random.default_rng(0).normal(size=(n, d_in)).astype(np.float32)
        x_path = os.path.join(tmp, "x.npy")
        np.save(x_path, x)
        flags = ["--output", "trace"]
        if tile:
            flags += ["--tile", str(tile)]
        if memory_budget:
            flags += ["--memory-budget", str(memory_budget)]
        if workers:
            flags += ["--workers", str(workers)]
        spec = f"{model_py}:factory"
        base = [sys.executable, "-m", "ntkdist"]
        planned = subprocess.run(
            [*base, "plan", spec, "--x1", x_path, *flags, "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if planned.returncode != 0:
            raise RuntimeError(f"ntkdist plan failed:\n{planned.stderr}")
        predicted = Plan.from_json(planned.stdout)
        log("$ ntkdist plan " + " ".join([spec, "--x1", x_path, *flags]))
        log(str(predicted))
        cmd = [
            *base,
            "compute",
            spec,
            "--x1",
            x_path,
            "--out",
            store,
            *flags,
            "--executor",
            executor,
        ]
        log("$ ntkdist " + " ".join(cmd[3:]))
        first = run_watched(cmd, store, os.path.join(tmp, "run1.log"), kill_at=kill_at)
        after_kill = _progress(store) or (0, 0)
        log(
            f"run 1: {first['seconds']:.1f} s, "
            + (
                f"killed (SIGKILL to the process group) at {after_kill[0]}/"
                f"{after_kill[1]} tiles"
                if first["killed"]
                else f"finished before the kill, exit {first['returncode']}"
            )
        )
        second = run_watched(cmd, store, os.path.join(tmp, "run2.log"))
        if second["returncode"] != 0:
            raise RuntimeError(f"the resumed run failed:\n{second['log_tail']}")
        final = ntkdist.open(store)
        done, total = final.progress()
        computing = _computing(second["log_head"])
        log(
            f"run 2: {second['seconds']:.1f} s, computed "
            f"{computing if computing is not None else '?'} tiles; {done}/{total} done"
        )
        disk = store_bytes(store)
        checks = _check(final, x, small_mlp(d_in, width, depth, out)[:2], check_tiles)
        holes = corrupt = None
        if verify_checksums:
            h, c = final.check_tiles()
            holes, corrupt = len(h), len(c)
        plan = final.plan
        apply_fn, params = small_mlp(d_in, width, depth, out)
        tile_flops = _tile_flops(apply_fn, params, plan.tile_rows, d_in)
        total_s = first["seconds"] + second["seconds"]
        peak = max(first["peak_rss_sum"], second["peak_rss_sum"])
        result = {
            "n": n,
            "model": f"MLP {d_in}→{'→'.join([str(width)] * depth)}→{out}, float32",
            "output": "trace",
            "flags": [*flags, "--executor", executor],
            "command": "ntkdist " + " ".join(cmd[3:]),
            "plan_text": str(predicted),
            "plan_predicted_seconds": predicted.est_seconds,
            "strategy": final.spec.strategy,
            "tile": plan.tile_rows,
            "tiles": total,
            "tiles_done": done,
            "complete": final.complete,
            "kill_at": kill_at,
            "killed": first["killed"],
            "tiles_done_before_kill": after_kill[0],
            "tiles_computed_after": computing,
            "survivors_of_kill": first["survivors_of_kill"],
            "first_run": first,
            "second_run": second,
            "total_seconds": total_s,
            "bytes_on_disk": disk,
            "plan_bytes_on_disk": plan.bytes_on_disk,
            "plan_peak_bytes_per_worker": plan.peak_bytes_per_worker,
            "peak_rss_sum": peak,
            "max_process_hwm": max(first["max_process_hwm"], second["max_process_hwm"]),
            "sum_process_hwm": max(first["sum_process_hwm"], second["sum_process_hwm"]),
            "memory_goal": MEMORY_GOAL,
            "memory_goal_met": peak < MEMORY_GOAL,
            "tile_fn_flops": tile_flops * total,
            "fraction_of_gemm": tile_flops * total / total_s / rate,
            "checks": checks,
            "checks_passed": all(c["ok"] for c in checks),
            "checksum_holes": holes,
            "checksum_corrupt": corrupt,
            "store": store if keep else None,
            "removed": not keep,
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["store_exists_after"] = os.path.exists(store)
    return result


def _computing(text: str) -> int | None:
    """Tiles the run said it would compute (``..., computing Z``)."""
    import re

    m = re.search(r"tiles done, computing (\d+)", text)
    return int(m.group(1)) if m else None


def _tile_flops(apply_fn: Any, params: Any, tile: int, d_in: int) -> float:
    from .._model import Model
    from ..kernels import get
    from . import _tiles as bench

    x = jnp.zeros((tile, d_in), jnp.float32)
    return bench.executed_flops(
        get("structured"), Model(apply_fn), params, x, x, "trace"
    )


def _check(
    store: Any, x: np.ndarray, model: tuple[Any, Any], count: int
) -> list[dict[str, Any]]:
    """Random tiles (both triangles) against ``ntkdist.ntk`` on their samples."""
    import ntkdist

    apply_fn, params = model
    plan = store.plan
    g1, g2 = plan.grid
    rng = np.random.default_rng(7)
    t = plan.tile_rows
    picks = {(int(rng.integers(g1)), int(rng.integers(g2))) for _ in range(count)}
    if count >= 2:
        picks.add((g1 - 1, 0))  # a mirrored tile, and the ragged last row
    out = []
    for i, j in sorted(picks):
        rows, cols = slice(i * t, (i + 1) * t), slice(j * t, (j + 1) * t)
        got = np.asarray(store.kernel[rows, cols])
        ref = np.asarray(
            ntkdist.ntk(apply_fn, params, x[rows], x[cols], output="trace")
        )
        # An independent reference on a corner: plain Jacobian contraction.
        m = JACOBIAN_CHECK
        ref_j = np.asarray(
            ntkdist.ntk(
                apply_fn,
                params,
                x[rows][:m],
                x[cols][:m],
                output="trace",
                strategy="jacobian",
            )
        )
        err, ok = _compare(got, ref)
        err_j, ok_j = _compare(got[:m, :m], ref_j)
        out.append(
            {
                "tile": [i, j],
                "max_relative_error": max(err, err_j),
                "vs_ntk_auto": err,
                "vs_jacobian_corner": err_j,
                "ok": ok and ok_j,
            }
        )
    return out


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, bool]:
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref))) / max(scale, 1e-30)
    return err, bool(np.allclose(got, ref, rtol=RTOL, atol=RTOL * scale))


def ooc_table(r: dict[str, Any]) -> str:
    """The figures of the ooc section, one per line."""
    c = r["checks"]
    rows = [
        ("kernel", f"trace {r['n']}×{r['n']}, {r['model']}, symmetric"),
        ("command", r["command"]),
        ("strategy / tile", f"{r['strategy']}, {r['tile']} ({r['tiles']} tiles)"),
        (
            "run 1 (killed)",
            f"{r['first_run']['seconds']:.1f} s, "
            + (
                f"SIGKILL at {r['tiles_done_before_kill']}/{r['tiles']} tiles"
                if r["killed"]
                else "finished before the kill"
            )
            + (
                f"; {len(r['survivors_of_kill'])} processes outlived it"
                if r["survivors_of_kill"]
                else ""
            ),
        ),
        (
            "run 2 (resume)",
            f"{r['second_run']['seconds']:.1f} s, computed "
            f"{r['tiles_computed_after']} tiles; complete: {r['complete']}",
        ),
        (
            "total wall time",
            f"{r['total_seconds']:.1f} s, "
            f"{100 * r['fraction_of_gemm']:.1f}% of the GEMM rate "
            "(tile function's XLA FLOPs / wall time); plan predicted "
            + (
                "-"
                if r["plan_predicted_seconds"] is None
                else f"{r['plan_predicted_seconds']:.1f} s"
            ),
        ),
        (
            "bytes on disk",
            f"{format_bytes(r['bytes_on_disk'])} (kernel alone, uncompressed: "
            f"{format_bytes(r['plan_bytes_on_disk'])})",
        ),
        (
            "peak memory",
            f"{format_bytes(r['peak_rss_sum'])} summed RSS of the CLI and its "
            f"descendants (goal < {format_bytes(r['memory_goal'])}: "
            f"{'met' if r['memory_goal_met'] else 'NOT met'}); largest process "
            f"VmHWM {format_bytes(r['max_process_hwm'])}, all processes' VmHWM "
            f"summed {format_bytes(r['sum_process_hwm'])}; plan per worker "
            f"{format_bytes(r['plan_peak_bytes_per_worker'])}",
        ),
        (
            "checked tiles",
            f"{sum(x['ok'] for x in c)}/{len(c)} match ntkdist.ntk (and a "
            f"{JACOBIAN_CHECK}² corner strategy='jacobian', rtol {RTOL}); "
            "max relative error "
            f"{max((x['max_relative_error'] for x in c), default=0):.1e}",
        ),
        (
            "store",
            r["store"]
            or (
                "removed"
                + (" (FAILED: still there)" if r["store_exists_after"] else "")
            ),
        ),
    ]
    if r["checksum_holes"] is not None:
        rows.append(
            (
                "checksums",
                f"{r['checksum_holes']} missing, {r['checksum_corrupt']} corrupt",
            )
        )
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
