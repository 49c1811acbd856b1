"""Memory and work per tile: a bilinear cost model and the largest tile in a budget."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .._errors import PlanError
from .._units import format_bytes as format_bytes, parse_bytes as parse_bytes

# Resident memory of a Dask worker process with JAX imported and one tile
# function compiled (measured on CPU with ``python -m ntkdist._engine_bench
# --sections memory``: 300 MiB at N = 2000 with a small MLP).
WORKER_BASELINE_BYTES = 300 * 2**20
# Temporaries XLA allocates beside a strategy's own arrays, as a multiple of
# the strategy's predicted bytes (the model's figure, before compiling).
XLA_OVERHEAD = 2.0
# Allocations beside the buffers XLA assigns in a compiled program, as a share
# of them (XLA:CPU's convolution scratch, the allocator's slack). Measured with
# in-process ``compute`` jobs on CPU, CIFAR ResNet-18 and ViT-tiny tiles of 16
# to 128 samples: peaks 2-22 % above XLA's figure (and the process baseline).
XLA_HEADROOM = 1.2
# Copies of an output tile alive at once in a task: the result, its cast,
# the transposed mirror and zarr's encoded chunk.
OUTPUT_COPIES = 4
# The same, beside a compiled contraction's buffers, which hold the output tile
# and its transposes: the mirror a symmetric job writes (kernel chunks of 1 MiB
# or more go to disk from small aligned buffers). An MLP ``full`` job in tiles
# of 1024 (output tiles of 0.39 GiB) peaked 0.45 GiB above XLA's figure.
COMPILED_OUTPUT_COPIES = 1


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Work of one ``n1 × n2`` tile as ``c + a·n1 + b·n2 + d·n1·n2``.

    Every strategy's cost is of this form in the tile's sides (factors grow
    with each side, contraction with their product), so four evaluations of
    a strategy's own ``cost`` fix it exactly.

    Attributes:
        flops: coefficients ``(c, a, b, d)`` of floating-point operations.
        bytes: coefficients ``(c, a, b, d)`` of the strategy's peak bytes.
        out_items: kernel values per sample pair (``O²``, ``O`` or 1).
        itemsize: bytes per kernel value.
        feature_bytes: bytes of one input sample.
        output_copies: copies of the output tile a worker holds beside the
            strategy's arrays.
    """

    flops: tuple[float, float, float, float]
    bytes: tuple[float, float, float, float]
    out_items: int
    itemsize: int
    feature_bytes: int
    output_copies: int = OUTPUT_COPIES

    @staticmethod
    def fit(
        samples: dict[tuple[int, int], tuple[float, float]],
        *,
        out_items: int,
        itemsize: int,
        feature_bytes: int,
    ) -> CostModel:
        """Fit from ``{(n1, n2): (flops, bytes)}`` at four corners of a rectangle.

        Example:
            >>> f = lambda a, b: (a * b * 2.0, a + b + 1.0)
            >>> s = {(m, n): f(m, n) for m in (8, 16) for n in (8, 16)}
            >>> m = CostModel.fit(s, out_items=1, itemsize=8, feature_bytes=8)
            >>> m.tile_flops(3, 5)
            30.0
        """
        (s1, s2) = sorted({k[0] for k in samples})
        (t1, t2) = sorted({k[1] for k in samples})

        def coeffs(idx: int) -> tuple[float, float, float, float]:
            f11, f21 = samples[(s1, t1)][idx], samples[(s2, t1)][idx]
            f12, f22 = samples[(s1, t2)][idx], samples[(s2, t2)][idx]
            d = (f22 - f21 - f12 + f11) / ((s2 - s1) * (t2 - t1))
            a = (f21 - f11) / (s2 - s1) - d * t1
            b = (f12 - f11) / (t2 - t1) - d * s1
            c = f11 - a * s1 - b * t1 - d * s1 * t1
            return (c, a, b, d)

        return CostModel(coeffs(0), coeffs(1), out_items, itemsize, feature_bytes)

    def tile_flops(self, n1: int, n2: int) -> float:
        """Predicted FLOPs of one ``n1 × n2`` tile."""
        c, a, b, d = self.flops
        return max(0.0, c + a * n1 + b * n2 + d * n1 * n2)

    def strategy_bytes(self, n1: int, n2: int) -> float:
        """The strategy's own predicted peak bytes for one ``n1 × n2`` tile."""
        c, a, b, d = self.bytes
        return max(0.0, c + a * n1 + b * n2 + d * n1 * n2)

    def worker_bytes(self, n1: int, n2: int) -> float:
        """Predicted peak resident bytes of a worker running ``n1 × n2`` tiles.

        The process baseline, the strategy's arrays with XLA's temporaries,
        the copies of the output tile, and the two input blocks.
        """
        out_tile = n1 * n2 * self.out_items * self.itemsize
        inputs = (n1 + n2) * self.feature_bytes
        return (
            WORKER_BASELINE_BYTES
            + XLA_OVERHEAD * self.strategy_bytes(n1, n2)
            + self.output_copies * out_tile
            + inputs
        )

    def calibrated(self, points: Sequence[tuple[int, int, float]]) -> CostModel:
        """This model with its bytes fitted to compiled tile programs.

        ``points`` are ``(n1, n2, compiled)``: the peak bytes of an ``n1 × n2``
        tile's programs as XLA assigned their buffers. The fitted model
        predicts ``XLA_HEADROOM`` times that for the strategy's arrays at the
        last point. With one point the model is scaled; with two (tiles of
        different sizes) the bytes are the line through the last two in the
        tile's samples ``n1 + n2``, as most of a program's buffers grow with
        the samples it holds.

        Example:
            >>> m = CostModel((0, 0, 0, 1), (0, 8, 8, 0), 1, 8, 8)
            >>> one = m.calibrated([(4, 4, 1000.0)])
            >>> round(XLA_OVERHEAD * one.strategy_bytes(4, 4))
            1200
            >>> two = m.calibrated([(4, 4, 1000.0), (2, 2, 600.0)])
            >>> round(XLA_OVERHEAD * two.strategy_bytes(1, 1))
            480
        """
        unit = XLA_HEADROOM / XLA_OVERHEAD
        n1, n2, compiled = points[-1]
        earlier = [p for p in points[:-1] if p[0] + p[1] != n1 + n2]
        if earlier:
            m1, m2, before = earlier[-1]
            slope = unit * (before - compiled) / (m1 + m2 - n1 - n2)
            base = unit * compiled - slope * (n1 + n2)
            fitted = (base, slope, slope, 0.0)
        elif (model := self.strategy_bytes(n1, n2)) <= 0:
            fitted = (unit * compiled, 0.0, 0.0, 0.0)
        else:
            fitted = tuple(b * unit * compiled / model for b in self.bytes)
        return dataclasses.replace(
            self, bytes=fitted, output_copies=COMPILED_OUTPUT_COPIES
        )


def round_up(n: float) -> float:
    """``n`` bytes rounded up to a whole MiB (KiB below one MiB)."""
    unit = 1 << 20 if n >= 1 << 20 else 1 << 10
    return math.ceil(n / unit) * unit


def smaller_output(output: str) -> str:
    """Advice to choose a smaller output form, where there is a smaller one."""
    if output in ("trace", "pntk"):
        return ""
    return ", or choose output='trace' or 'pntk' (O² times smaller)"


def largest_tile_within(
    budget: float,
    cost: CostModel,
    n_max: int,
    *,
    what: str = "this job",
    output: str = "",
) -> int:
    """The largest square tile side ``t <= n_max`` whose worker bytes fit ``budget``.

    Raises:
        PlanError: not even a 1×1 tile fits; the message says how much is needed.

    Example:
        >>> m = CostModel((0, 0, 0, 1), (0, 0, 0, 8), 1, 8, 8)
        >>> largest_tile_within(2**30, m, 100)
        100
    """
    need = cost.worker_bytes(1, 1)
    if need > budget:
        raise PlanError(
            f"memory_budget={format_bytes(budget)} cannot hold one 1×1 tile of "
            f"{what}: a worker needs at least {format_bytes(need)} (of which "
            f"{format_bytes(WORKER_BASELINE_BYTES)} is the JAX worker process "
            f"itself). Raise memory_budget to at least {format_bytes(round_up(need))}"
            + smaller_output(output)
            + "."
        )
    lo, hi = 1, max(1, n_max)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost.worker_bytes(mid, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
