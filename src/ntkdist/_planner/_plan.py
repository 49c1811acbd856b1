"""Plan: the tile layout and predicted figures of one kernel job, pure and printable."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from .._errors import InputError, PlanError
from ._budget import CostModel, format_bytes, largest_tile_within
from ._tiling import Tile, n_blocks, tiles

# Largest default tile side: keeps chunks and task times moderate.
DEFAULT_MAX_TILE = 1024
# A default plan gives each worker at least this many tiles when N allows.
MIN_TILES_PER_WORKER = 2
# Smallest tile side the parallelism rule may shrink to.
MIN_TILE = 32
# Factor cache per worker when no memory budget is given.
DEFAULT_CACHE_BYTES = 2 * 2**30
# FLOP/s assumed when choosing a cache level without a measured rate.
DEFAULT_FLOP_RATE = 5e10
# Bytes/s assumed for reading factors back from a local factor store.
READ_RATE = 1e9
# Bytes/s assumed for writing the kernel (about one local SSD).
WRITE_RATE = 1e9
CACHE_LEVELS = ("none", "memory", "store")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a kernel job is split into tiles, and what it is predicted to cost.

    Attributes:
        n1: samples of ``x1``.
        n2: samples of ``x2`` (``n1`` when symmetric).
        out_dim: model outputs ``O``.
        output: ``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``.
        symmetric: ``x2=None``: only tiles ``i <= j`` are computed.
        tile: requested tile side (samples).
        strategy: name of the strategy computing each tile.
        dtype: kernel dtype (``"float64"`` or ``"float32"``).
        workers: workers the figures assume.
        memory_budget: bytes per worker the tile was sized for (or ``None``).
        strategy_repr: the strategy instance's ``repr`` (``structured``
            records the tile its per-weight rules were chosen for).
        memory_limit: without a budget, the bytes per worker the tile was
            sized within (or, given, checked against): this machine's memory
            per worker (or ``None``).
        tile_flops: predicted FLOPs of one full tile.
        total_flops: predicted FLOPs of all tiles.
        peak_bytes_per_worker: predicted peak resident bytes of one worker.
        compiled_bytes: the tile's programs' own peak bytes as XLA assigned
            their buffers when it compiled them; ``peak_bytes_per_worker``
            is then sized on it (``None``: not compiled, the cost model's
            estimate).
        bytes_on_disk: kernel bytes before compression.
        flop_rate: FLOP/s of one worker's contractions, measured on a probe
            tile (or ``None``).
        factor_rate: FLOP/s of one worker's factor passes, measured on a
            probe block (``None``: ``flop_rate``).
        cache: where blocks' factors are kept between tiles: ``"none"``
            (recomputed for every tile), ``"memory"`` (each worker's cache)
            or ``"store"`` (also a Zarr factor store beside the kernel).
        cache_bytes: capacity of each worker's factor cache.
        factor_bytes: bytes of every block's factors (both inputs).
        flops_no_reuse: total FLOPs if factors were recomputed for every tile.
        read_bytes: predicted bytes of factors written to and read back from
            the factor store.
        factor_flops: the factor passes' share of ``total_flops``.
        parallel: devices the measured rate scales over (``0``: ``workers``).
            Workers sharing one CPU share its cores, so a probe that used
            them all gives ``1``; one GPU per worker gives ``workers``.

    Example:
        >>> p = Plan(n1=5, n2=5, out_dim=2, output="trace", symmetric=True, tile=2,
        ...          strategy="jacobian", dtype="float64")
        >>> p.n_tiles, Plan.from_json(p.to_json()) == p
        (6, True)
    """

    n1: int
    n2: int
    out_dim: int
    output: str
    symmetric: bool
    tile: int
    strategy: str
    dtype: str
    workers: int = 1
    memory_budget: float | None = None
    tile_flops: float = 0.0
    total_flops: float = 0.0
    peak_bytes_per_worker: float = 0.0
    bytes_on_disk: float = 0.0
    flop_rate: float | None = None
    cache: str = "none"
    cache_bytes: float = 0.0
    factor_bytes: float = 0.0
    flops_no_reuse: float = 0.0
    read_bytes: float = 0.0
    parallel: int = 0
    factor_flops: float = 0.0
    factor_rate: float | None = None
    memory_limit: float | None = None
    strategy_repr: str = ""
    compiled_bytes: float | None = None

    def __post_init__(self) -> None:
        """Check the plan is self-consistent."""
        if self.tile < 1 or self.n1 < 1 or self.n2 < 1:
            raise PlanError(
                f"tile={self.tile}, n1={self.n1}, n2={self.n2}: all must be >= 1."
            )
        if self.symmetric and self.n1 != self.n2:
            raise PlanError(
                f"a symmetric plan needs n1 == n2, got {self.n1}, {self.n2}."
            )

    @property
    def tile_rows(self) -> int:
        """Tile side along ``x1`` (the chunk size of axis 0)."""
        return min(self.tile, self.n1)

    @property
    def tile_cols(self) -> int:
        """Tile side along ``x2`` (the chunk size of axis 1)."""
        return self.tile_rows if self.symmetric else min(self.tile, self.n2)

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles along each axis of the whole kernel."""
        return (n_blocks(self.n1, self.tile_rows), n_blocks(self.n2, self.tile_cols))

    @property
    def n_tiles(self) -> int:
        """Tiles to compute (the upper triangle when symmetric)."""
        g1, g2 = self.grid
        return g1 * (g1 + 1) // 2 if self.symmetric else g1 * g2

    @property
    def est_seconds(self) -> float | None:
        """Predicted wall time (``None`` without a probe).

        FLOPs at the probe's rate over ``parallel`` devices, plus factor-store
        I/O and writing the kernel (I/O is not assumed to overlap compute).
        Excludes cluster start-up and compilation.
        """
        if not self.flop_rate:
            return None
        parallel = max(1, min(self.parallel or self.workers, self.n_tiles))
        factor_rate = self.factor_rate or self.flop_rate
        compute = (
            (self.total_flops - self.factor_flops) / self.flop_rate
            + self.factor_flops / factor_rate
        ) / parallel
        return compute + self.read_bytes / READ_RATE + self.bytes_on_disk / WRITE_RATE

    @property
    def nominal_seconds(self) -> float:
        """Predicted time at the nominal FLOP and read rates, to compare plans
        of one job (``strategy="auto"`` picks the smallest)."""
        return self.total_flops / DEFAULT_FLOP_RATE + self.read_bytes / READ_RATE

    def tiles(self) -> tuple[Tile, ...]:
        """The tiles, row-major (upper triangle with mirrors when symmetric)."""
        return tiles(self.n1, self.n2, self.tile_rows, self.tile_cols, self.symmetric)

    def to_json(self) -> str:
        """A JSON string; ``Plan.from_json`` reads it back equal."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | dict[str, Any]) -> Plan:
        """The plan written by ``to_json`` (a string or the decoded dict)."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        return Plan(**data)

    def __str__(self) -> str:
        """A table of the plan and its predicted figures."""
        g1, g2 = self.grid
        est = self.est_seconds
        rate = (
            "not measured"
            if not self.flop_rate
            else f"{self.flop_rate / 1e9:.2f} GFLOP/s contracting"
            + (
                f", {self.factor_rate / 1e9:.2f} GFLOP/s computing factors"
                if self.factor_rate
                else ""
            )
        )
        budget = (
            format_bytes(self.memory_budget)
            if self.memory_budget is not None
            else "none"
            if self.memory_limit is None
            else f"none; tiles fit {format_bytes(self.memory_limit)}, this "
            "machine's memory per worker"
        )
        lines = [
            (
                "kernel",
                f"{self.output} {self.n1}×{self.n2}, O={self.out_dim}, {self.dtype}"
                + (", symmetric (x2 = x1)" if self.symmetric else ""),
            ),
            ("strategy", self.strategy + _rules_note(self.strategy_repr)),
            ("tile", f"{self.tile_rows}×{self.tile_cols} samples (grid {g1}×{g2})"),
            (
                "tiles to compute",
                f"{self.n_tiles}"
                + (" (upper triangle, mirrors written)" if self.symmetric else ""),
            ),
            ("bytes on disk", f"{format_bytes(self.bytes_on_disk)} (uncompressed)"),
            (
                "peak memory/worker",
                f"{format_bytes(self.peak_bytes_per_worker)} ("
                + (
                    "estimated"
                    if self.compiled_bytes is None
                    else f"XLA assigns the tile's programs "
                    f"{format_bytes(self.compiled_bytes)}"
                )
                + f"; budget {budget})",
            ),
            ("factors", self._factor_line()),
            (
                "FLOPs",
                f"{self.total_flops:.3g} ({self.tile_flops:.3g} per tile"
                + (
                    f"; {self.flops_no_reuse:.3g} recomputing factors per tile)"
                    if self.flops_no_reuse > self.total_flops
                    else ")"
                ),
            ),
            ("probe rate", rate),
            (
                "estimated time",
                "unknown"
                if est is None
                else f"{_fmt_seconds(est)} on {self.workers} worker(s)"
                + (
                    " sharing one machine's cores"
                    if self.parallel == 1 and self.workers > 1
                    else ""
                )
                + " (excluding start-up and compilation)",
            ),
        ]
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)

    def _factor_line(self) -> str:
        what = {
            "none": "recomputed for every tile",
            "memory": f"kept in each worker's memory (up to "
            f"{format_bytes(self.cache_bytes)})",
            "store": f"written once to a factor store beside the kernel, cached "
            f"in memory (up to {format_bytes(self.cache_bytes)})",
        }[self.cache]
        return f"{format_bytes(self.factor_bytes)} in all; {what}"


def _rules_note(text: str) -> str:
    """Where ``structured``'s per-weight rules were chosen for other than its
    default 256-sample tiles, the tile they were chosen for."""
    match = re.search(r"nominal_tile=(\d+)", text)
    if not match or int(match[1]) == 256:
        return ""
    return f" (per-weight rules chosen for {match[1]}-sample tiles)"


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def make_plan(
    *,
    n1: int,
    n2: int,
    out_dim: int,
    output: str,
    symmetric: bool,
    dtype: str,
    strategy: str,
    cost: CostModel,
    tile: int | None = None,
    memory_budget: float | None = None,
    memory_limit: float | None = None,
    workers: int = 1,
    flop_rate: float | None = None,
    max_tile: int = DEFAULT_MAX_TILE,
    factor_bytes_per_sample: float = 0.0,
    cache: str = "auto",
    cache_budget: float | None = None,
    disk_limit: float | None = None,
) -> Plan:
    """Size the tiles and predict the figures of one job.

    With ``tile=None`` the tile is the largest square within ``memory_budget``
    (without one, within ``memory_limit``, the machine's memory per worker)
    (at most ``max_tile``), shrunk while needed to give each worker
    ``MIN_TILES_PER_WORKER`` tiles, then evened out so the last tile is
    nearly full (2,000 samples: two tiles of 1,000, not 1,024 and 976). An
    explicit ``tile`` is checked against the budget.

    Raises:
        PlanError: the budget cannot hold one tile (the message says how much
            is needed), or an explicit ``tile`` does not fit it.

    Example:
        >>> m = CostModel((0, 10, 10, 4), (0, 8, 8, 0), 1, 8, 8)
        >>> p = make_plan(n1=100, n2=100, out_dim=1, output="trace", symmetric=True,
        ...               dtype="float64", strategy="jacobian", cost=m, tile=30)
        >>> p.n_tiles, p.grid
        (10, (4, 4))
    """
    what = f"output={output!r} with strategy {strategy!r}"
    n_max = max(n1, n2)
    # Without a budget, tiles fit the machine (memory_limit), sized or given,
    # wherever even one sample fits it; a budget replaces the limit.
    if memory_budget is not None or (
        memory_limit is not None and cost.worker_bytes(1, 1) > memory_limit
    ):
        memory_limit = None
    cap = memory_budget if memory_budget is not None else memory_limit
    if tile is not None:
        if tile < 1:
            raise InputError(f"tile={tile}; expected a positive number of samples.")
        t = min(tile, n_max)
        if cap is not None and cost.worker_bytes(t, t) > cap:
            fits = largest_tile_within(cap, cost, n_max, what=what, output=output)
            over, advice = (
                (f" but memory_budget={format_bytes(cap)}", "raise the budget")
                if memory_budget is not None
                else (
                    f", more than the {format_bytes(cap)} a worker has on this machine",
                    "pass no tile, to have it sized, or memory_budget= if the "
                    "workers run where there is more memory",
                )
            )
            raise PlanError(
                f"tile={tile} needs {format_bytes(cost.worker_bytes(t, t))} per "
                f"worker{over}; the largest tile that fits is {fits}. Pass "
                f"tile<={fits} or {advice}."
            )
    else:
        budget = cap if cap is not None else math.inf
        t = largest_tile_within(
            budget, cost, min(n_max, max_tile), what=what, output=output
        )
        while (
            t > MIN_TILE
            and _count(n1, n2, t, symmetric) < MIN_TILES_PER_WORKER * workers
        ):
            t = max(MIN_TILE, t * 3 // 4)
        # Same number of tiles, sides as even as possible: ragged blocks are
        # padded to the full tile, so this removes most of the padding work.
        t = math.ceil(n_max / n_blocks(n_max, t))
    plan = Plan(
        n1=n1,
        n2=n2,
        out_dim=out_dim,
        output=output,
        symmetric=symmetric,
        tile=t,
        strategy=strategy,
        dtype=dtype,
        workers=workers,
        memory_budget=memory_budget,
        memory_limit=memory_limit,
    )
    tr, tc = plan.tile_rows, plan.tile_cols
    worker = cost.worker_bytes(tr, tc)
    if cache_budget is None:
        cache_budget = (
            DEFAULT_CACHE_BYTES
            if memory_budget is None
            else max(0.0, memory_budget - worker)
        )
        if plan.memory_limit is not None:
            cache_budget = min(cache_budget, max(0.0, plan.memory_limit - worker))
    c, _, _, d = cost.flops
    contract = plan.n_tiles * max(0.0, c + d * tr * tc)
    passes = {
        level: _reuse_figures(plan, cost, level, factor_bytes_per_sample, cache_budget)
        for level in CACHE_LEVELS
    }
    figures = {k: (contract + f, r) for k, (f, r) in passes.items()}
    if cache == "auto":
        factors_all = _all_factor_bytes(plan, factor_bytes_per_sample)
        if disk_limit is not None and factors_all > disk_limit:
            # A factor store that would not fit on disk is no choice.
            figures_fit = {k: v for k, v in figures.items() if k != "store"}
        else:
            figures_fit = figures
        level = choose_cache(figures_fit, factor_bytes_per_sample, flop_rate)
    elif cache in CACHE_LEVELS:
        level = cache
    else:
        raise InputError(f"cache={cache!r}; expected 'auto' or one of {CACHE_LEVELS}.")
    flops, read = figures[level]
    # The cache keeps whole blocks only (one larger than it keeps nothing),
    # the tile's own two among them, which ``worker`` counts already.
    block = factor_bytes_per_sample * min(tr, tc)
    held = (
        0.0
        if level == "none" or block > cache_budget
        else max(
            0.0,
            min(cache_budget, _all_factor_bytes(plan, factor_bytes_per_sample))
            - factor_bytes_per_sample * (tr + tc),
        )
    )
    return dataclasses.replace(
        plan,
        tile_flops=cost.tile_flops(tr, tc),
        total_flops=flops,
        peak_bytes_per_worker=worker + held,
        bytes_on_disk=float(n1 * n2 * cost.out_items * cost.itemsize),
        flop_rate=flop_rate,
        cache=level,
        cache_bytes=cache_budget if level != "none" else 0.0,
        factor_bytes=_all_factor_bytes(plan, factor_bytes_per_sample),
        flops_no_reuse=figures["none"][0],
        read_bytes=read,
        factor_flops=passes[level][0],
    )


def _all_factor_bytes(plan: Plan, per_sample: float) -> float:
    g1, g2 = plan.grid
    rows = g1 * plan.tile_rows + (0 if plan.symmetric else g2 * plan.tile_cols)
    return per_sample * rows


def _reuse_figures(
    plan: Plan, cost: CostModel, level: str, per_sample: float, budget: float
) -> tuple[float, float]:
    """Factor-pass FLOPs and factor-store bytes (written and read) at ``level``.

    A tile's FLOPs are ``c + a·n1 + b·n2 + d·n1·n2``: ``a·n1`` and ``b·n2`` are
    its two blocks' factor passes (a symmetric diagonal tile makes one), the
    rest its contraction, which no level changes. Ragged blocks are padded
    to the full tile, so every pass costs a full block's.
    """
    _, a, b, _ = cost.flops
    tr, tc = plan.tile_rows, plan.tile_cols
    g1, g2 = plan.grid
    n_tiles = plan.n_tiles
    diagonal = g1 if plan.symmetric else 0
    cols = (n_tiles - diagonal) * b * tc  # column-block passes, one per tile
    every_tile = n_tiles * a * tr + cols
    blocks = g1 * a * tr + (0.0 if plan.symmetric else g2 * b * tc)
    if level == "none" or per_sample <= 0:
        return every_tile, 0.0
    workers = max(1, min(plan.workers, n_tiles))
    block_bytes = per_sample * max(tr, tc)
    total = _all_factor_bytes(plan, per_sample)
    fits_all = total <= budget
    if level == "memory":
        if fits_all:  # each worker computes each block at most once
            return min(every_tile, workers * blocks), 0.0
        if budget < 2 * block_bytes:
            return every_tile, 0.0
        # The row block stays hot along its row; column blocks are recomputed.
        return min(every_tile, workers * g1 * a * tr) + cols, 0.0
    # store: every block computed once and written; a worker reads back the
    # blocks others computed (all fit) or every block it no longer holds.
    reads = (workers - 1) * total if fits_all else 2 * n_tiles * block_bytes
    return blocks, total + reads


def choose_cache(
    figures: dict[str, tuple[float, float]],
    per_sample: float,
    flop_rate: float | None,
) -> str:
    """The level with the smallest predicted time (FLOPs at the rate, plus reads).

    Near-ties go to the simpler level (``none`` < ``memory`` < ``store``): a
    store is chosen only when reading factors back clearly beats recomputing.

    Example:
        >>> choose_cache({"none": (10.0, 0), "memory": (4.0, 0), "store": (4.0, 0)},
        ...              8.0, None)
        'memory'
    """
    if per_sample <= 0:
        return "none"
    rate = flop_rate or DEFAULT_FLOP_RATE
    seconds = {k: f / rate + r / READ_RATE for k, (f, r) in figures.items()}
    levels = [k for k in CACHE_LEVELS if k in figures]
    best = min(levels, key=lambda k: (seconds[k], CACHE_LEVELS.index(k)))
    # Keep the simpler level unless the other saves at least 10 %: I/O
    # predictions are rougher than FLOP counts.
    for simpler in levels[: levels.index(best)]:
        if seconds[simpler] <= 1.1 * seconds[best]:
            return simpler
    return best


def _count(n1: int, n2: int, t: int, symmetric: bool) -> int:
    g1, g2 = n_blocks(n1, min(t, n1)), n_blocks(n2, min(t, n2))
    return g1 * (g1 + 1) // 2 if symmetric else g1 * g2
