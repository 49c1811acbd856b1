"""The ``real`` section: tiles and a whole kernel of real networks.

For each case of :data:`ntkdist._bench._models.REAL_CASES` named (default
``resnet18-cifar`` and ``vit-tiny``), each tile size and output, one tile
``ntkdist.ntk(apply, params, x1, x2, output=..., strategy=...)`` with
``x1 ≠ x2`` runs in a process of its own, so that its peak resident memory is
its own. Reported: the first call (compilation included), the median of the
timed calls, the strategy ``auto`` ran, XLA's FLOPs of that tile and their
fraction of the GEMM rate, the peak resident memory beside the plan's
prediction for a worker running such tiles (``Plan.peak_bytes_per_worker``;
the strategy's own predicted bytes are in the JSON), and the memory the
process held before the first call (interpreter, JAX and the parameters).

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
    # What ``compute``'s plan budgets for a worker running such tiles.
    planned = ntkdist.plan(
        fn, params, x1, x2, output=output, strategy=chosen, tile=tile, probe=False
    )
    before = _rss_now()

    def run() -> Any:
        k = ntkdist.ntk(fn, params, x1, x2, output=output, strategy=chosen)
        return np.asarray(k)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
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
        "peak_rss_bytes": peak,
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
        f"  plan {row['plan_worker_bytes'] / gib:5.2f} GiB"
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
    """The whole symmetric kernel of ``case`` through ``ntkdist.compute``."""
    import numpy as np

    import ntkdist

    from ._models import REAL_CASES

    fn, params, shape = REAL_CASES[case]()
    x = np.random.default_rng(3).standard_normal((n, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = os.path.join(tmp, "kernel.zarr")
        plan = ntkdist.plan(fn, params, x, output=output, workers=workers)
        t0 = time.perf_counter()
        ntkdist.compute(
            fn,
            params,
            x,
            store=path,
            output=output,
            workers=workers,
            executor=executor,
            progress=False,
        )
        wall = time.perf_counter() - t0
    return {
        "case": case,
        "n": n,
        "output": output,
        "strategy": plan.strategy,
        "tile": plan.tile,
        "tiles": plan.n_tiles,
        "seconds": wall,
        "predicted_seconds": plan.est_seconds,
        "peak_bytes_per_worker": plan.peak_bytes_per_worker,
        "gemm_rate": rate,
    }


def engine_line(row: dict[str, Any]) -> str:
    """One line for the engine run."""
    return (
        f"{row['case']} N={row['n']} {row['output']}: {row['seconds']:.1f} s end to "
        f"end ({row['tiles']} tiles of {row['tile']}, {row['strategy']}; plan "
        f"predicted {row['predicted_seconds'] or float('nan'):.1f} s without start-up "
        "and compilation)"
    )


if __name__ == "__main__":
    case, tile, output, repeats, strategy = sys.argv[1:6]
    print(json.dumps(one_tile(case, int(tile), output, int(repeats), strategy)))
