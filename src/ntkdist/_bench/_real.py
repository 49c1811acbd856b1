"""The ``real`` section: tiles and a whole kernel of real networks.

For each case of :data:`ntkdist._bench._models.REAL_CASES` named (default
``resnet18-cifar`` and ``vit-tiny``), each tile size and output, one tile
``ntkdist.ntk(apply, params, x1, x2, output=..., strategy=...)`` with
``x1 ≠ x2`` runs in a process of its own, so that its peak resident memory is
its own. Reported: the first call (compilation included), the median of the
timed calls, the strategy ``auto`` ran, XLA's FLOPs of that tile and their
fraction of the GEMM rate, the peak resident memory beside the plan's
prediction for a worker running such tiles (``Plan.peak_bytes_per_worker``;
the strategy's own predicted bytes are in the JSON), the prediction from the
tile's compiled program (the memory held before the first call, interpreter,
JAX, the parameters and the compiled program, plus ``XLA_HEADROOM`` times the
buffers XLA assigned the program), and the memory held before the first call.

Then the whole symmetric kernel of one case through ``ntkdist.compute``
(start-up, compilation and the Zarr store included), with the plan's
prediction.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_CASES = ("resnet18-cifar", "vit-tiny")


def _rss_now() -> float:
    """Resident memory of this process now, in bytes (Linux)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return float("nan")


def device_peak() -> float | None:
    """Peak bytes JAX's allocator has held on the first device (accelerators),
    ``None`` where the backend keeps no statistics (CPU)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    peak = stats.get("peak_bytes_in_use")
    return float(peak) if peak is not None else None


def one_tile(case: str, tile: int, output: str, repeats: int, strategy: str) -> dict:
    """Measure one tile in this process (run by :func:`run_real` in a child)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ntkdist

    from .._model import Model
    from ..kernels._choose import choose, for_tile
    from ._models import REAL_CASES, n_params
    from ._tiles import executed_flops

    fn, params, shape = REAL_CASES[case]()
    rng = np.random.default_rng(1)
    x1 = jnp.asarray(rng.standard_normal((tile, *shape)), jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((tile, *shape)), jnp.float32)
    model = Model(fn)
    # The strategy ``ntk`` runs for this tile, and then exactly that one.
    if strategy == "auto":
        chosen, _ = choose(model, params, x1, tile, tile, output, one_tile=True)
    else:
        chosen = for_tile(strategy, tile, tile)
    predicted = chosen.cost(model, params, x1, tile, tile, output)
    # What ``compute``'s plan budgets for a worker running such tiles (one
    # worker: the tile runs alone in this process, with this machine's memory).
    planned = ntkdist.plan(
        fn,
        params,
        x1,
        x2,
        output=output,
        strategy=chosen,
        tile=tile,
        probe=False,
        workers=1,
    )
    from .._planner._budget import XLA_HEADROOM
    from ..kernels._choose import tile_bytes

    # The tile's one program, compiled here for XLA's figure of its buffers
    # (``ntk`` reuses it; the first call's time includes this compilation).
    t0 = time.perf_counter()
    need = tile_bytes(chosen, model, params, x1, x2, output)  # XLA_HEADROOM × buffers
    compile_seconds = time.perf_counter() - t0
    before = _rss_now()

    def run() -> Any:
        k = ntkdist.ntk(fn, params, x1, x2, output=output, strategy=chosen)
        return np.asarray(k)

    t0 = time.perf_counter()
    run()
    first = compile_seconds + time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    device = device_peak()
    flops = executed_flops(chosen, model, params, x1, x2, output)
    jax.clear_caches()
    return {
        "case": case,
        "params": n_params(params),
        "tile": tile,
        "output": output,
        "strategy": chosen.name,
        "first_seconds": first,
        "seconds": statistics.median(times),
        "times": times,
        "xla_flops": flops,
        "predicted_flops": predicted.flops,
        "predicted_bytes": predicted.bytes,
        "plan_worker_bytes": planned.peak_bytes_per_worker,
        "rss_before_bytes": before,
        "xla_tile_bytes": None if need is None else need / XLA_HEADROOM,
        "xla_predicted_peak_bytes": None if need is None else before + need,
        "peak_rss_bytes": peak,
        "device_peak_bytes": device,
        "backend": jax.default_backend(),
    }


def run_real(
    rate: float,
    *,
    cases: Sequence[str] = DEFAULT_CASES,
    tiles: Sequence[int] = (16, 64),
    outputs: Sequence[str] = ("full", "trace"),
    repeats: int = 3,
    strategy: str = "auto",
    timeout: float = 3600.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per case, tile and output, each measured in a fresh process."""
    rows = []
    for case in cases:
        for tile in tiles:
            for output in outputs:
                cmd = [
                    sys.executable,
                    "-m",
                    "ntkdist._bench._real",
                    case,
                    str(tile),
                    output,
                    str(repeats),
                    strategy,
                ]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout
                )
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                    row = {"case": case, "tile": tile, "output": output}
                    row["failed"] = tail[0] if tail else f"exit {proc.returncode}"
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    row["fraction_of_gemm"] = row["xla_flops"] / row["seconds"] / rate
                rows.append(row)
                log(_format(row))
    return rows


def _format(row: dict[str, Any]) -> str:
    head = f"{row['case']:<20} tile {row['tile']:>4} {row['output']:<6}"
    if "failed" in row:
        return f"{head} failed: {row['failed']}"
    gib = 2.0**30
    return (
        f"{head} {row['strategy']:<10} {row['seconds']:8.3f} s "
        f"(first {row['first_seconds']:6.1f} s)  {row['xla_flops'] / 1e9:8.1f} GFLOP "
        f"{100 * row['fraction_of_gemm']:4.0f}% of GEMM  peak "
        f"{row['peak_rss_bytes'] / gib:5.2f} GiB "
        f"(before {row['rss_before_bytes'] / gib:4.2f})"
        + (
            f"  XLA {row['xla_predicted_peak_bytes'] / gib:5.2f} GiB"
            if row.get("xla_predicted_peak_bytes")
            else ""
        )
        + f"  plan {row['plan_worker_bytes'] / gib:5.2f} GiB"
        + (
            f"  device peak {row['device_peak_bytes'] / gib:5.2f} GiB"
            if row.get("device_peak_bytes")
            else ""
        )
    )


def real_table(rows: Sequence[dict[str, Any]]) -> str:
    """The ``real`` rows, one line each."""
    return "\n".join(_format(r) for r in rows)


def run_engine(
    rate: float,
    *,
    case: str,
    n: int,
    output: str = "trace",
    workers: int | None = None,
    executor: str = "dask",
    scratch: str | None = None,
) -> dict[str, Any]:
    """The whole symmetric kernel of ``case`` through ``ntkdist.compute``.

    Where JAX runs on GPUs, on the embedded cluster ``compute`` itself would
    start (one worker per GPU), made here so that each worker's peak device
    memory can be read after the job.
    """
    import numpy as np

    import ntkdist

    from ..executors._dask import gpu_cluster
    from ..executors._workers import local_gpus
    from ._models import REAL_CASES

    fn, params, shape = REAL_CASES[case]()
    x = np.random.default_rng(3).standard_normal((n, *shape)).astype(np.float32)
    gpus = local_gpus() if workers is None else []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = os.path.join(tmp, "kernel.zarr")
        plan = ntkdist.plan(
            fn, params, x, output=output, workers=workers or len(gpus) or None
        )
        device: dict[str, Any] = {}
        t0 = time.perf_counter()

        def run(**how: Any) -> float:
            ntkdist.compute(
                fn, params, x, store=path, output=output, progress=False, **how
            )
            return time.perf_counter() - t0

        if gpus:
            from distributed import Client

            with gpu_cluster(gpus, x64=False) as cluster, Client(cluster) as client:
                client.wait_for_workers(len(gpus))
                wall = run(client=client, plan=plan)
                device = client.run(device_peak)
        else:
            wall = run(workers=workers, executor=executor)
    peaks = [v for v in device.values() if v]
    return {
        "case": case,
        "n": n,
        "output": output,
        "strategy": plan.strategy,
        "tile": plan.tile,
        "tiles": plan.n_tiles,
        "seconds": wall,
        "tiles_per_second": plan.n_tiles / wall,
        "predicted_seconds": plan.est_seconds,
        "flops": plan.total_flops,
        "fraction_of_gemm": plan.total_flops / wall / (rate * max(1, len(gpus))),
        "peak_bytes_per_worker": plan.peak_bytes_per_worker,
        "device_peak_bytes": max(peaks) if peaks else None,
        "workers": len(gpus) or workers,
        "gemm_rate": rate,
    }


def run_plan(case: str, n1: int, n2: int, output: str = "trace") -> dict[str, Any]:
    """``ntkdist.plan``'s figures (probe included) for an ``n1 × n2`` kernel of
    ``case``, e.g. the CIFAR-10 train+test × train kernel, 60,000 × 50,000."""
    import numpy as np

    import ntkdist

    from ..executors._workers import local_gpus
    from ._models import REAL_CASES

    fn, params, shape = REAL_CASES[case]()
    x1 = np.random.default_rng(4).standard_normal((n1, *shape), dtype=np.float32)
    x2 = x1[:n2]
    gpus = len(local_gpus()) or None
    plan = ntkdist.plan(fn, params, x1, x2, output=output, workers=gpus)
    return {
        "case": case,
        "n1": n1,
        "n2": n2,
        "output": output,
        "workers": plan.workers,
        "tile": plan.tile,
        "tiles": plan.n_tiles,
        "strategy": plan.strategy,
        "predicted_seconds": plan.est_seconds,
        "flops": plan.total_flops,
        "peak_bytes_per_worker": plan.peak_bytes_per_worker,
        "text": str(plan),
    }


def engine_line(row: dict[str, Any]) -> str:
    """One line for the engine run."""
    gib = 2.0**30
    device = row.get("device_peak_bytes")
    return (
        f"{row['case']} N={row['n']} {row['output']}: {row['seconds']:.1f} s end to "
        f"end ({row['tiles']} tiles of {row['tile']}, {row['strategy']}, "
        f"{row.get('tiles_per_second', float('nan')):.2f} tiles/s, "
        f"{100 * row.get('fraction_of_gemm', float('nan')):.0f}% of GEMM; plan "
        f"predicted {row['predicted_seconds'] or float('nan'):.1f} s without start-up "
        f"and compilation, {row['peak_bytes_per_worker'] / gib:.2f} GiB per worker"
        + (f"; device peak {device / gib:.2f} GiB" if device else "")
        + ")"
    )


if __name__ == "__main__":
    case, tile, output, repeats, strategy = sys.argv[1:6]
    print(json.dumps(one_tile(case, int(tile), output, int(repeats), strategy)))
