"""``compute``: plan + store + execute, resumable; ``open`` and ``repair``."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import zarr

from . import _inputs
from ._errors import ExecutionError, InputError, ModelError, PlanError, StoreError
from ._model import ApplyFn, Model, as_model
from ._planner import CostModel, Plan, Tile, make_plan, parse_bytes
from ._planner._plan import DEFAULT_FLOP_RATE, READ_RATE
from ._precision import (
    DEFAULT as DEFAULT_PRECISION,
    applies_precision,
    current as current_precision,
    matmul_precision,
)
from .executors import (
    AbstractExecutor,
    DaskExecutor,
    InputSource,
    Progress,
    SerialExecutor,
    TileSpec,
    read_block,
)
from .executors._dask import default_workers
from .executors._factors import (
    create_factor_stores,
    factor_bytes_per_sample,
    factors_fn,
    forget_job,
)
from .kernels import (
    STRATEGIES,
    AbstractKernelStrategy,
    check_supported,
    choose,
    get,
    tile_shape,
)
from .storage import (
    KernelStore,
    StoreLock,
    array_digest,
    check_same_job,
    digest,
    fingerprint,
    model_digest,
    params_digest,
    remove_store,
    store_state,
)
from .storage._zarr import is_url

# Tile side at which ``strategy="auto"`` compares strategies.
NOMINAL_TILE = 256
# Tile sides at which a strategy's cost is evaluated to fit the cost model.
COST_PROBE = 16
# Largest probe tile timed to measure the FLOP rates.
RATE_PROBE = 256


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: model, params, inputs, and what identifies them."""

    model: Model
    params: Any
    x1: Any
    x2: Any | None
    output: str
    strategy: AbstractKernelStrategy
    out_dim: int
    dtype: str
    probe: np.ndarray
    fields: dict[str, str]
    auto: bool = False
    precision: str = DEFAULT_PRECISION

    @property
    def n1(self) -> int:
        """Samples of ``x1``."""
        return int(self.x1.shape[0])

    @property
    def n2(self) -> int:
        """Samples of ``x2`` (``n1`` when symmetric)."""
        return self.n1 if self.x2 is None else int(self.x2.shape[0])


def prepare(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
) -> Job:
    """Validate the arguments once and fingerprint model, params and inputs.

    Inputs are read in row blocks (zarr and dask inputs are never loaded whole).
    Runs at the matmul precision in force (``compute`` and ``plan`` set it).

    Raises:
        InputError: an argument is malformed.
        ModelError: the model does not map ``[n, ...]`` to ``[n, O]``.
    """
    _inputs.check_output(output)
    _inputs.check_strategy(strategy)
    _inputs.check_params(params, check_finite=check_finite)
    x1 = _as_array(x1, "x1", integer_inputs)
    x2 = None if x2 is None else _as_array(x2, "x2", integer_inputs)
    _inputs.check_pair(x1, x2)
    model = as_model(apply_fn)
    probe = np.asarray(x1[: min(4, int(x1.shape[0]))])
    out_dim = _inputs.check_model(model, params, probe, independence=check_independence)
    dtype = str(np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(params), probe)))
    if strategy == "auto":
        t = min(NOMINAL_TILE, int(x1.shape[0]))
        chosen, _ = choose(model, params, jnp.asarray(probe), t, t, output, None)
    else:
        chosen = get(strategy)
        check_supported(chosen, model, params, jnp.asarray(probe), output)
    import ntkdist

    fields = {
        "model": model_digest(model, params, probe[:1]),
        "params": params_digest(params),
        "x1": array_digest(x1, "x1", check_finite=check_finite),
        "x2": "symmetric"
        if x2 is None
        else array_digest(x2, "x2", check_finite=check_finite),
        "output": digest(output),
        "strategy": digest(repr(chosen)),
        "dtype": digest(dtype),
        "precision": digest(current_precision()),
        "versions": digest(ntkdist.__version__, jax.__version__),
    }
    return Job(
        model,
        params,
        x1,
        x2,
        output,
        chosen,
        out_dim,
        dtype,
        probe,
        fields,
        auto=strategy == "auto",
        precision=current_precision(),
    )


def _as_array(x: Any, name: str, integer_inputs: bool) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, jax.Array):
        x = np.asarray(x)
    return _inputs.as_inputs(x, name, integer_inputs=integer_inputs, check_finite=False)


def cost_model(job: Job) -> CostModel:
    """Fit the strategy's cost of an ``n1 × n2`` tile from four of its estimates."""
    s = COST_PROBE
    x = jnp.asarray(job.probe)
    samples = {}
    for a in (s, 2 * s):
        for b in (s, 2 * s):
            c = job.strategy.cost(job.model, job.params, x, a, b, job.output)
            samples[(a, b)] = (float(c.flops), float(c.bytes))
    out_items = int(np.prod(tile_shape(job.output, 1, 1, job.out_dim)))
    feature = (
        int(np.prod(job.x1.shape[1:], dtype=np.int64)) * np.dtype(job.x1.dtype).itemsize
    )
    return CostModel.fit(
        samples,
        out_items=out_items,
        itemsize=np.dtype(job.dtype).itemsize,
        feature_bytes=feature,
    )


def measure_rate(job: Job, plan: Plan, cost: CostModel) -> tuple[float, float | None]:
    """FLOP/s of contractions and of factor passes, measured here.

    Uses the jitted functions the workers run, on a probe block of up to
    ``RATE_PROBE`` samples (compiled first, then timed once). The factor rate
    is ``None`` for strategies whose factors cost nothing.
    """
    from .executors._factors import contract_fn

    p = min(plan.tile_rows, plan.tile_cols, RATE_PROBE)
    x = jnp.asarray(np.asarray(job.x1[:p]))
    if len(x) < p:
        return 0.0, None
    args = (job.strategy, job.model, job.output, job.params)

    def timed(fn: Any, *a: Any) -> tuple[Any, float]:
        jax.block_until_ready(fn(*args, *a))  # compile
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, *a))
        return out, max(time.perf_counter() - t0, 1e-9)

    f1, t_factors = timed(factors_fn, x)
    f2 = jax.block_until_ready(factors_fn(*args, x[::-1]))
    _, t_contract = timed(contract_fn, f1, f2)
    c, a, _, d = cost.flops
    factor_rate = a * p / t_factors if a > 0 else None
    return max(0.0, c + d * p * p) / t_contract, factor_rate


def with_strategy(job: Job, strategy: AbstractKernelStrategy) -> Job:
    """``job`` computed with ``strategy`` (its fingerprint field follows)."""
    return dataclasses.replace(
        job,
        strategy=strategy,
        fields={**job.fields, "strategy": digest(repr(strategy))},
        auto=False,
    )


def plan_job(
    job: Job,
    *,
    tile: int | None = None,
    memory_budget: Any = None,
    workers: int = 1,
    probe: bool = True,
    cache: str = "auto",
) -> tuple[Job, Plan]:
    """Size tiles for ``job`` and predict its figures (no store is touched).

    With ``strategy="auto"`` every strategy is planned for the whole job
    (tiles, factor reuse, memory budget) and the one with the smallest
    predicted time wins; the returned job carries it.
    """
    candidates = [job]
    if job.auto:
        candidates = [with_strategy(job, get(name)) for name in STRATEGIES]
    plans: list[tuple[float, int, Job, Plan, CostModel]] = []
    errors: list[PlanError] = []
    for k, cand in enumerate(candidates):
        if cand.strategy is not job.strategy:
            try:  # auto: a strategy that cannot handle the model is no candidate
                check_supported(
                    cand.strategy, cand.model, cand.params, cand.probe, cand.output
                )
            except ModelError:
                continue
        try:
            p, cost = _plan_one(cand, tile, memory_budget, workers, cache)
        except PlanError as e:
            errors.append(e)
            continue
        seconds = p.total_flops / DEFAULT_FLOP_RATE + p.read_bytes / READ_RATE
        # Ties go to structured (the first among equals below).
        plans.append(
            (seconds, 0 if cand.strategy.name == "structured" else 1 + k, cand, p, cost)
        )
    if not plans:
        raise errors[0]
    _, _, job, best, cost = min(plans, key=lambda t: (t[0], t[1]))
    if probe:
        rate, factor_rate = measure_rate(job, best, cost)
        best = dataclasses.replace(
            best, flop_rate=rate, factor_rate=factor_rate, parallel=_parallel(workers)
        )
    return job, best


def _parallel(workers: int) -> int:
    """Devices a rate measured here scales over: one per worker on accelerators;
    on CPU the probe already used every core the workers would share."""
    return workers if jax.default_backend() != "cpu" else 1


def _plan_one(
    job: Job, tile: int | None, memory_budget: Any, workers: int, cache: str
) -> tuple[Plan, CostModel]:
    """The plan of ``job`` with its own strategy, and that strategy's cost model."""
    cost = cost_model(job)
    per_sample = factor_bytes_per_sample(
        job.strategy,
        job.model,
        job.params,
        tuple(job.probe.shape[1:]),
        job.probe.dtype,
        job.output,
    )
    the_plan = make_plan(
        n1=job.n1,
        n2=job.n2,
        out_dim=job.out_dim,
        output=job.output,
        symmetric=job.x2 is None,
        dtype=job.dtype,
        strategy=job.strategy.name,
        cost=cost,
        tile=tile,
        memory_budget=parse_bytes(memory_budget),
        workers=workers,
        factor_bytes_per_sample=per_sample,
        cache=cache,
    )
    return the_plan, cost


@applies_precision
def plan(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    tile: int | None = None,
    memory_budget: Any = None,
    workers: int | None = None,
    probe: bool = True,
    cache: str = "auto",
    precision: str = DEFAULT_PRECISION,
) -> Plan:
    """The plan ``compute`` would follow, without computing or storing anything.

    Args:
        apply_fn: the model, as for :func:`ntkdist.ntk`.
        params: its parameters.
        x1: inputs ``[N1, ...]`` (numpy, zarr or dask).
        x2: inputs ``[N2, ...]``, or ``None`` for the symmetric ``x2 = x1``.
        output: the output form (see :func:`ntkdist.ntk`).
        strategy: a strategy name, ``"auto"`` or an instance.
        tile: tile side in samples; ``None`` sizes it from ``memory_budget``.
        memory_budget: bytes per worker (``"2GiB"`` or a number).
        workers: workers the figures assume (default: CPU count).
        probe: time one small tile here to predict the wall time.
        cache: where factors are kept between tiles (``"auto"``, ``"none"``,
            ``"memory"``, ``"store"``; see :func:`compute`).
        precision: float32 matmul precision (see :func:`ntkdist.ntk`).

    Returns:
        The :class:`Plan`; ``print`` it for the figures.

    Example:
        >>> import jax.numpy as jnp, numpy as np, ntkdist
        >>> f = lambda p, x: jnp.tanh(x @ p["w"])
        >>> p = ntkdist.plan(f, {"w": np.ones((3, 2))}, np.ones((10, 3)), tile=4,
        ...                  output="trace", probe=False)
        >>> p.n_tiles
        6
    """
    job = prepare(apply_fn, params, x1, x2, output=output, strategy=strategy)
    return plan_job(
        job,
        tile=tile,
        memory_budget=memory_budget,
        workers=workers or default_workers(),
        probe=probe,
        cache=cache,
    )[1]


@applies_precision
def compute(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    store: str | os.PathLike[str],
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    tile: int | None = None,
    memory_budget: Any = None,
    cache: str = "auto",
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    executor: str | AbstractExecutor | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model_spec: str | None = None,
    window: int | None = None,
    retries: int = 3,
    resources: dict[str, float] | None = None,
    stream: TextIO | None = None,
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> KernelStore:
    """Compute the empirical NTK tile by tile into a Zarr store; resumable.

    Same values, shapes and conventions as :func:`ntkdist.ntk` (see its
    docstring for the four output forms). Each tile is one Zarr chunk along
    both sample axes; a symmetric job (``x2=None``) computes tiles ``i <= j``
    and writes each mirror. Running the same call again computes only the
    tiles without a completion marker.

    Args:
        apply_fn: ``apply_fn(params, x) -> [n, O]``.
        params: a pytree of floating-point arrays.
        x1: inputs ``[N1, ...]``: numpy, jax, dask, or a zarr array (read tile
            by tile by the workers, never loaded whole).
        x2: inputs ``[N2, ...]``, or ``None`` for ``x2 = x1``.
        store: path (or fsspec URL) of the Zarr store to create or resume.
        output: ``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``.
        strategy: ``"jacobian"``, ``"ntvp"``, ``"structured"``, ``"auto"`` or an
            instance.
        tile: tile side in samples; ``None`` sizes it from ``memory_budget``.
        memory_budget: peak bytes per worker (``"2GiB"`` or a number).
        cache: where each input block's factors are kept between tiles, so
            that a kernel costs one factor pass per block rather than two
            per tile: ``"memory"`` (each worker's cache), ``"store"`` (also
            a Zarr factor store inside the kernel store, shared by workers
            and kept across interruptions), ``"none"`` (recompute), or
            ``"auto"`` (the plan's predicted fastest). Values do not depend
            on it.
        client: a ``distributed.Client`` to run on.
        scheduler: a scheduler address to connect to (instead of ``client``).
        workers: worker processes of the embedded ``LocalCluster`` (used when
            neither ``client`` nor ``scheduler`` is given; default CPU count).
        executor: ``"serial"`` (in this process), ``"dask"`` (default), or an
            executor instance.
        overwrite: discard an existing store of a different job and start over.
        progress: print the dashboard address and a progress bar to ``stream``.
        model_spec: the ``file.py:factory`` spec recorded for ``verify --repair``.
        window: tile futures in flight (default two per worker thread).
        retries: retries of a failed tile task.
        resources: Dask resources each tile task needs, e.g. ``{"GPU": 1}``
            on a cluster whose workers declare one GPU each.
        stream: where progress goes (default stderr).
        check_finite: refuse NaN/inf in params or inputs.
        check_independence: refuse models whose outputs couple samples.
        integer_inputs: allow integer inputs (token or class ids).
        precision: float32 matmul precision (see :func:`ntkdist.ntk`); part
            of the fingerprint.

    Returns:
        The finished store, opened read-only (``.kernel`` is the zarr array).

    Raises:
        InputError: a malformed argument (nothing is written).
        PlanError: the memory budget cannot hold one tile.
        ResumeMismatchError: the store holds a different job (names the fields).
        StoreLockedError: another live job is writing the store.
        StoreError: the path is read-only or holds something else.
        ExecutionError: tiles failed; finished ones stay recorded, rerun resumes.

    Example:
        >>> import jax.numpy as jnp, numpy as np, ntkdist, tempfile, os
        >>> f = lambda p, x: jnp.tanh(x @ p["w"])
        >>> path = os.path.join(tempfile.mkdtemp(), "k.zarr")
        >>> s = ntkdist.compute(f, {"w": np.ones((3, 2))}, np.ones((5, 3)), store=path,
        ...                     output="trace", tile=2, executor="serial",
        ...                     progress=False)
        >>> s.complete, s.kernel.shape
        (True, (5, 5))
    """
    path = os.fspath(store)
    out = stream or sys.stderr
    job = prepare(
        apply_fn,
        params,
        x1,
        x2,
        output=output,
        strategy=strategy,
        check_finite=check_finite,
        check_independence=check_independence,
        integer_inputs=integer_inputs,
    )
    runner = _executor(
        executor,
        client,
        scheduler,
        workers,
        job.dtype == "float64",
        window,
        retries,
        out,
        progress,
        resources,
    )
    stored = _stored_attrs(path) if not overwrite else None
    if stored is not None:
        tile = stored["plan"]["tile"] if tile is None else tile
        if cache == "auto":
            cache = stored["plan"].get("cache", "none")
        if strategy == "auto" and stored.get("strategy") in STRATEGIES:
            job = with_strategy(job, get(stored["strategy"]))
    job, the_plan = plan_job(
        job,
        tile=tile,
        memory_budget=memory_budget,
        workers=runner.n_workers,
        probe=False,
        cache=cache,
    )
    fields = {
        **job.fields,
        "tile": digest(f"{the_plan.tile_rows}x{the_plan.tile_cols}"),
    }
    lock = _lock(path)
    try:
        kstore = _create_or_resume(path, job, the_plan, fields, overwrite, model_spec)
        todo = kstore.todo()
        _run(
            kstore,
            job.model,
            job.params,
            todo,
            runner,
            progress,
            out,
            job.strategy,
            cache=(the_plan.cache, the_plan.cache_bytes),
        )
    finally:
        if lock is not None:
            lock.release()
    return KernelStore.open(path)


def open(store: str | os.PathLike[str]) -> KernelStore:
    """Open a finished or partial kernel store read-only.

    Returns:
        A :class:`KernelStore` with ``.kernel`` (zarr, NaN where not yet
        written), ``.to_dask()``, ``.progress()``, ``.complete``, ``.output``,
        ``.out_dim``, ``.n1``, ``.n2``, ``.symmetric``, ``.fields``,
        ``.fingerprint`` and ``.attrs`` (the JSON job spec).

    Raises:
        StoreError: nothing, or not a kernel store, is at ``store``.
    """
    return KernelStore.open(os.fspath(store), mode="r")


def repair(
    store: str | os.PathLike[str],
    apply_fn: ApplyFn | Model,
    params: Any,
    *,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    executor: str | AbstractExecutor | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
) -> tuple[list[Tile], list[Tile]]:
    """Recompute exactly the tiles of a store that are missing or corrupt.

    Returns:
        ``(holes, corrupt)`` as found before repairing.

    Raises:
        ResumeMismatchError: the model or params are not the store's.
    """
    path = os.fspath(store)
    out = stream or sys.stderr
    lock = _lock(path)
    try:
        kstore = KernelStore.open(path, mode="r+")
        holes, corrupt = kstore.check_tiles()
        if holes or corrupt:
            model = as_model(apply_fn)
            spec = _spec_of(kstore)

            probe = read_block(spec.x1, (0, 1), 1)
            with matmul_precision(spec.precision):
                new = {
                    "model": model_digest(model, params, probe),
                    "params": params_digest(params),
                }
            check_same_job({k: kstore.fields[k] for k in new}, new, path)
            kstore.clear_tiles(corrupt)
            runner = _executor(
                executor,
                client,
                scheduler,
                workers,
                kstore.plan.dtype == "float64",
                None,
                3,
                out,
                progress,
            )
            todo = [t for t in kstore.plan.tiles() if t in set(holes) | set(corrupt)]
            _run(kstore, model, params, todo, runner, progress, out)
        return holes, corrupt
    finally:
        if lock is not None:
            lock.release()


# -- internals ----------------------------------------------------------------


def _executor(
    executor: str | AbstractExecutor | None,
    client: Any,
    scheduler: str | None,
    workers: int | None,
    x64: bool,
    window: int | None,
    retries: int,
    out: TextIO,
    verbose: bool,
    resources: dict[str, float] | None = None,
) -> AbstractExecutor:
    if isinstance(executor, AbstractExecutor):
        return executor
    if executor == "serial":
        return SerialExecutor()
    if executor not in (None, "dask"):
        raise InputError(
            f"executor={executor!r}; expected 'dask', 'serial' or an "
            "AbstractExecutor instance."
        )
    return DaskExecutor(
        client,
        address=scheduler,
        n_workers=workers,
        x64=x64,
        window=window,
        retries=retries,
        stream=out,
        verbose=verbose,
        resources=resources,
    )


def _stored_attrs(path: str) -> dict[str, Any] | None:
    if store_state(path) != "ntkdist":
        return None
    return KernelStore.open(path).attrs


def _lock(path: str) -> StoreLock | None:
    if is_url(path):
        return None  # object stores: one job per store is the caller's duty
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        lock = StoreLock(path)
        lock.acquire()
    except PermissionError as err:
        raise StoreError(
            f"cannot write at {path}: {err.strerror or err} (the location is "
            "read-only for this user). Choose a writable store path."
        ) from err
    except (NotADirectoryError, FileNotFoundError) as err:
        raise StoreError(
            f"cannot create a store at {path}: {err}. Choose a path in an "
            "existing, writable directory."
        ) from err
    except OSError as err:
        if isinstance(err, StoreError):
            raise
        raise StoreError(f"cannot write at {path}: {err}.") from err
    return lock


def _create_or_resume(
    path: str,
    job: Job,
    the_plan: Plan,
    fields: dict[str, str],
    overwrite: bool,
    model_spec: str | None,
) -> KernelStore:
    state = store_state(path)
    if state == "other":
        raise StoreError(
            f"the store path {path} already holds something that is not an ntkdist "
            "kernel store; it was left untouched. Choose another path (or remove "
            "it yourself)."
        )
    if state == "ntkdist":
        existing = KernelStore.open(path, mode="r+")
        if not overwrite:
            check_same_job(existing.fields, fields, path)
            return existing
        remove_store(path)
    inputs, sources = {}, {}
    for name, x in (("x1", job.x1), ("x2", job.x2)):
        if x is None:
            sources[name] = None
            continue
        src = _zarr_source(x)
        if src is None:
            inputs[name] = x
            src = {"root": "", "path": f"inputs/{name}"}
        sources[name] = {**src, "shape": list(x.shape), "dtype": str(np.dtype(x.dtype))}
    spec = {
        "output": job.output,
        "out_dim": job.out_dim,
        "n1": job.n1,
        "n2": job.n2,
        "symmetric": job.x2 is None,
        "strategy": job.strategy.name,
        "strategy_repr": repr(job.strategy),
        "dtype": job.dtype,
        "precision": job.precision,
        "tile": [the_plan.tile_rows, the_plan.tile_cols],
        "fields": fields,
        "fingerprint": fingerprint(fields),
        "model_spec": model_spec,
        "model_name": _qualname(job.model.apply_fn),
        "inputs": sources,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "conventions": _CONVENTIONS[job.output],
    }
    return KernelStore.create(path, plan=the_plan, spec=spec, inputs=inputs)


_CONVENTIONS = {
    "full": "K[i,j,a,b] = <df_a(x1_i)/dθ, df_b(x2_j)/dθ>",
    "trace": "K[i,j] = (1/O) Σ_a full[i,j,a,a]",
    "diagonal": "K[i,j,a] = full[i,j,a,a]",
    "pntk": "K[i,j] = (1/O) Σ_a Σ_b full[i,j,a,b]",
}


def _zarr_source(x: Any) -> dict[str, str] | None:
    if not isinstance(x, zarr.Array):
        return None
    root = getattr(x.store, "root", None)
    if root is None:
        return None  # a memory store cannot be read by worker processes
    return {"root": os.fspath(root), "path": x.path}


def _forget(runner: AbstractExecutor, spec: TileSpec) -> None:
    """Free the job's cached factors in every process that computed tiles."""
    forget_job(spec.fingerprint, spec.store)
    client = getattr(runner, "client", None)
    if client is not None:
        with contextlib.suppress(Exception):  # a worker gone meanwhile is fine
            client.run(forget_job, spec.fingerprint, spec.store)


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _versions() -> dict[str, str]:
    import dask

    import ntkdist

    return {
        "ntkdist": ntkdist.__version__,
        "jax": jax.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "python": sys.version.split()[0],
    }


def _spec_of(
    kstore: KernelStore,
    strategy: AbstractKernelStrategy | None = None,
    cache: tuple[str, float] | None = None,
) -> TileSpec:
    a = kstore.attrs

    def source(d: dict[str, Any] | None) -> InputSource | None:
        if d is None:
            return None
        return InputSource(d["root"] or os.path.abspath(kstore.path), d["path"])

    x1 = source(a["inputs"]["x1"])
    if x1 is None:
        raise StoreError(f"the store at {kstore.path} records no x1 input.")
    if strategy is None and a["strategy"] not in STRATEGIES:
        raise StoreError(
            f"the store was computed with a custom strategy {a['strategy_repr']}; "
            "recompute with ntkdist.compute and the same strategy instance."
        )
    p = kstore.plan
    return TileSpec(
        store=os.path.abspath(kstore.path),
        x1=x1,
        x2=source(a["inputs"]["x2"]),
        output=p.output,
        strategy=strategy or get(a["strategy"]),
        tile_rows=p.tile_rows,
        tile_cols=p.tile_cols,
        dtype=p.dtype,
        fingerprint=kstore.fingerprint,
        model_key=kstore.fields.get("model", ""),
        cache=cache[0] if cache else p.cache,
        cache_bytes=cache[1] if cache else p.cache_bytes,
        precision=stored_precision(kstore),
    )


def stored_precision(kstore: KernelStore) -> str:
    """The precision a store's job computes at (stores written before the
    setting existed computed at JAX's default)."""
    return str(kstore.attrs.get("precision", "default"))


def _run(
    kstore: KernelStore,
    model: Model,
    params: Any,
    todo: Sequence[Tile],
    runner: AbstractExecutor,
    progress: bool,
    out: TextIO,
    strategy: AbstractKernelStrategy | None = None,
    cache: tuple[str, float] | None = None,
) -> None:
    done, total = kstore.progress()
    if progress:
        out.write(
            f"[ntkdist] store {kstore.path}: {done}/{total} tiles done, "
            f"computing {len(todo)}\n"
        )
        out.flush()
    if not todo:
        return
    spec = _spec_of(kstore, strategy, cache)
    if spec.cache == "store":
        create_factor_stores(spec, kstore.plan.grid, model, params)

    with runner:
        bar = Progress(done=done, total=total, stream=out, enabled=progress)

        def on_done(tile: Tile, checksums: tuple[int, int]) -> None:
            kstore.write_marker(tile, checksums)
            bar.advance()

        failures = runner.run(spec, model, params, todo, on_done)
        bar.close()
        if spec.cache != "none":
            _forget(runner, spec)
    if failures:
        tile, err = failures[0]
        raise ExecutionError(
            f"{len(failures)} of {len(todo)} tiles failed (first: tile {tile.key}, "
            f"{type(err).__name__}: {err}). Finished tiles are recorded; run the "
            "same job again to compute only the missing ones."
        ) from err
