"""The entry points: ``ntk`` in memory; ``plan``, ``compute``, ``open``, ``repair``.

Signatures and docstrings live here; the work is in :mod:`ntkdist._job`
(validation, fingerprint), :mod:`ntkdist._planning` (the plan) and
:mod:`ntkdist._run` (the store and the tile loop).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from . import _inputs
from ._auto import plan_and_choose, say_plan, tiles_left
from ._job import prepare
from ._lru import LRU
from ._model import ApplyFn, Model, as_model
from ._ntk_fn import _signature
from ._planner import Plan, Tile
from ._planning import plan_job
from ._precision import (
    DEFAULT as DEFAULT_PRECISION,
    applies_precision,
    matmul_precision,
)
from ._run import (
    create_or_resume,
    finished,
    job_fields,
    locked,
    make_executor,
    remove_leftovers,
    run_tiles,
    stored_spec,
    tile_spec,
)
from ._units import parse_bytes
from .executors import AbstractExecutor, read_block
from .executors._devices import default_workers
from .kernels import AbstractKernelStrategy
from .kernels._choose import run_first
from .storage import KernelStore, check_same_job, params_digest
from .storage._fingerprint import describe_params, model_fingerprint


@applies_precision
def ntk(
    apply_fn: ApplyFn | Model,
    params: Any,
    x1: Any,
    x2: Any | None = None,
    *,
    output: str = "full",
    strategy: str | AbstractKernelStrategy = "auto",
    memory_budget: float | str | None = None,
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> np.ndarray:
    """The empirical NTK of ``apply_fn`` between ``x1`` and ``x2``, in memory.

    With ``J(x)`` the Jacobian of the outputs with respect to all of ``params``
    and ``Θ[i, j, a, b] = <∂f_a(x1_i)/∂θ, ∂f_b(x2_j)/∂θ>``:

    - ``output="full"``: ``Θ``, shape ``(N1, N2, O, O)``.
    - ``output="trace"``: ``(1/O) Σ_a Θ[i, j, a, a]``, shape ``(N1, N2)``
      (the mean, as neural-tangents' ``trace_axes=(-1,)``).
    - ``output="diagonal"``: ``Θ[i, j, a, a]``, shape ``(N1, N2, O)``.
    - ``output="pntk"``: ``(1/O) Σ_a Σ_b Θ[i, j, a, b]``, shape ``(N1, N2)``:
      the pseudo-NTK, i.e. the NTK of ``Σ_a f_a / √O``.

    Args:
        apply_fn: ``apply_fn(params, x) -> [n, O]``; ``[n]`` means ``O = 1`` and
            trailing output axes are flattened into ``O``. Each sample's output
            must depend on that sample alone.
        params: a pytree of floating-point arrays; the kernel differentiates
            with respect to all of them.
        x1: inputs ``[N1, *features]``.
        x2: inputs ``[N2, *features]``, or ``None`` for ``x2 = x1``, in which
            case the result is exactly symmetric.
        output: ``"full"``, ``"trace"``, ``"diagonal"`` or ``"pntk"``.
        strategy: ``"jacobian"`` (Jacobian contraction, the reference),
            ``"ntvp"`` (NTK-vector products), ``"structured"`` (structured
            derivatives), ``"auto"`` (fewest predicted FLOPs that fit
            ``memory_budget``), or an ``AbstractKernelStrategy``.
        memory_budget: bytes ``auto``'s tile program may hold (``"2GiB"`` or
            a number), as XLA assigns its buffers when it compiles it;
            ``None`` means no limit.
        check_finite: refuse NaN/inf in params or inputs (an error, not a warning).
        check_independence: refuse models whose outputs couple samples.
        integer_inputs: allow integer inputs (token or class ids).
        precision: float32 matrix-multiply precision: ``"highest"`` (true
            float32, the default), or a faster reduced one where the hardware
            has it: ``"tensorfloat32"``, ``"bfloat16"``, ``"default"`` (JAX's
            backend default: TF32 on recent NVIDIA GPUs). No effect on CPUs
            or in float64.

    Returns:
        A ``numpy.ndarray`` on the host, always, whatever the inputs are
        (numpy or ``jax.Array``): the kernel is computed on the default
        device and copied back, ready for numpy, scipy and the consumers in
        :mod:`ntkdist.regression`. Its dtype follows the inputs' (float64 when
        jax's x64 is enabled and the inputs are float64). For a ``jax.Array``
        that stays on the device and can be traced by ``jax.jit``, use
        :func:`ntkdist.ntk_fn`.

    Raises:
        InputError: an argument is malformed (the message says what to do).
        ModelError: ``apply_fn`` does not return ``[n, O]`` per sample.
        PlanError: ``strategy="auto"`` finds nothing within ``memory_budget``.

    Example:
        >>> import jax.numpy as jnp, ntkdist
        >>> f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> p = {"w1": jnp.ones((3, 4)) / 2, "w2": jnp.ones((4, 2)) / 2}
        >>> k = ntkdist.ntk(f, p, jnp.ones((5, 3)), output="trace")
        >>> type(k).__name__, k.shape
        ('ndarray', (5, 5))
    """
    _inputs.check_output(output)
    _inputs.check_strategy(strategy)
    budget = parse_bytes(memory_budget)
    _inputs.check_params(params, check_finite=check_finite)
    x1 = _inputs.as_inputs(
        x1, "x1", integer_inputs=integer_inputs, check_finite=check_finite
    )
    if x2 is not None:
        x2 = _inputs.as_inputs(
            x2, "x2", integer_inputs=integer_inputs, check_finite=check_finite
        )
    _inputs.check_pair(x1, x2)
    model = as_model(apply_fn)
    x1 = jnp.asarray(x1)
    x2 = None if x2 is None else jnp.asarray(x2)
    key = (
        model,
        output,
        strategy,
        budget,
        check_independence,
        jax.config.jax_default_matmul_precision,
        _signature(params, x1, x2),
    )
    chosen = _CHOSEN.get(key)
    if chosen is not None:  # checked and chosen before: the tile alone
        result = chosen.tile(model, params, x1, x2, output)
    else:
        _inputs.check_model(model, params, x1, independence=check_independence)
        chosen, result = run_first(
            strategy,
            model,
            params,
            x1,
            x2,
            output,
            budget,
            lambda s: s.tile(model, params, x1, x2, output),
        )
        _CHOSEN.put(key, chosen)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params), x1)
    return np.asarray(result.astype(dtype))


# What ``ntk`` checked and chose, by call: the model, the settings and the
# shapes of params and inputs. A repeated call skips the model's structural
# checks, the cost model and the trace (values are still checked for NaN).
_CHOSEN: LRU[tuple[Any, ...], AbstractKernelStrategy] = LRU(max_items=32)


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
    check_finite: bool = True,
    check_independence: bool = True,
    integer_inputs: bool = False,
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
        probe: compile the tile's programs here, for the memory XLA assigns
            them (a sized tile they do not fit is made smaller), and time one
            small tile to predict the wall time. Without it, the memory is the
            cost model's estimate.
        cache: where factors are kept between tiles (``"auto"``, ``"none"``,
            ``"memory"``, ``"store"``; see :func:`compute`).
        precision: float32 matmul precision (see :func:`ntkdist.ntk`).
        check_finite: refuse NaN/inf in params or inputs.
        check_independence: check that a sample's output does not depend on
            the rest of its batch.
        integer_inputs: accept integer inputs (token or class ids).

    Returns:
        The :class:`Plan`; ``print`` it for the figures, and pass it to
        :func:`compute` as ``plan=`` to run exactly it.

    Example:
        >>> import jax.numpy as jnp, numpy as np, ntkdist
        >>> f = lambda p, x: jnp.tanh(x @ p["w"])
        >>> w, x = np.ones((3, 2), np.float32), np.ones((10, 3), np.float32)
        >>> p = ntkdist.plan(f, {"w": w}, x, tile=4, output="trace", probe=False)
        >>> p.n_tiles
        6
    """
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
    plan: Plan | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    executor: str | AbstractExecutor | None = "auto",
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
        plan: a plan from :func:`plan` for these arguments, run as it is
            (its tiles, cache level and strategy); ``None`` plans here as
            :func:`plan` does (a resumed store keeps its tiles).
        client: a ``distributed.Client`` to run on.
        scheduler: a scheduler address to connect to (instead of ``client``).
        workers: worker processes of the embedded ``LocalCluster`` (used when
            neither ``client`` nor ``scheduler`` is given; default CPU count).
        executor: ``"auto"`` (default): in this process when the plan
            predicts under 20 s of tiles here (less than a cluster's
            start-up), else as ``"dask"``; ``workers``, ``scheduler`` or
            ``client`` mean a cluster. ``"serial"`` (in this process),
            ``"dask"`` (``None`` too: a cluster), or an executor instance.
        overwrite: discard an existing store of a different job and start over.
        progress: print the plan, where tiles run, the dashboard address
            and a progress bar to ``stream``.
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
        InputError: a malformed argument, or a ``plan`` made for another job
            (nothing is written).
        PlanError: the memory budget cannot hold one tile.
        ResumeMismatchError: the store holds a different job (names the fields).
        StoreLockedError: another live job is writing the store.
        StoreError: the path is read-only or holds something else.
        ExecutionError: tiles failed; finished ones stay recorded, rerun resumes.

    Example:
        >>> import jax.numpy as jnp, numpy as np, ntkdist, tempfile, os
        >>> f = lambda p, x: jnp.tanh(x @ p["w"])
        >>> path = os.path.join(tempfile.mkdtemp(), "k.zarr")
        >>> w, x = np.ones((3, 2), np.float32), np.ones((5, 3), np.float32)
        >>> s = ntkdist.compute(f, {"w": w}, x, store=path, output="trace", tile=2,
        ...                     executor="serial", progress=False)
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

    def make(name: Any) -> AbstractExecutor:
        return make_executor(
            name,
            client=client,
            scheduler=scheduler,
            workers=workers,
            x64=job.dtype == "float64",
            window=window,
            retries=retries,
            resources=resources,
            stream=out,
            verbose=progress,
        )

    stored = None if overwrite else stored_spec(path)
    embedded = client is None and scheduler is None
    job, the_plan, runner, why = plan_and_choose(
        job,
        executor=executor,
        make=make,
        forced=not embedded or workers is not None,
        tile=tile,
        memory_budget=memory_budget,
        cache=cache,
        stored=stored,
        given=plan,
        left=lambda j, p: tiles_left(path, job_fields(j, p), p),
        # A rate measured here predicts an embedded cluster's, not another's.
        probe=progress and embedded,
        disk_dir=os.path.dirname(os.path.abspath(path)),
    )
    if not overwrite and (done := finished(path, job, the_plan)) is not None:
        if progress:
            out.write(
                f"[ntkdist] store {path}: {done.plan.n_tiles}/{done.plan.n_tiles} "
                "tiles done, nothing to compute\n"
            )
            out.flush()
        return done
    if progress:
        left = tiles_left(path, job_fields(job, the_plan), the_plan)
        say_plan(out, the_plan, left, why)
    with locked(path, out) as lock:
        kstore = create_or_resume(
            path, job, the_plan, overwrite=overwrite, model_spec=model_spec
        )
        run_tiles(
            kstore,
            job.model,
            job.params,
            kstore.todo(),
            runner,
            progress=progress,
            out=out,
            strategy=job.strategy,
            cache=(the_plan.cache, the_plan.cache_bytes),
            lock=lock,
        )
    return KernelStore.open(path)


def open(store: str | os.PathLike[str]) -> KernelStore:
    """Open a finished or partial kernel store read-only.

    Returns:
        A :class:`KernelStore` with ``.kernel`` (zarr, NaN where not yet
        written), ``.to_dask()``, ``.progress()``, ``.complete``, ``.output``,
        ``.out_dim``, ``.n1``, ``.n2``, ``.symmetric``, ``.fields``,
        ``.fingerprint``, ``.attrs`` (the JSON job spec) and ``.spec`` (the
        same, typed: :class:`ntkdist.storage.StoreSpec`).

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
    with locked(path, out) as lock:
        kstore = KernelStore.open(path, mode="r+")
        remove_leftovers(kstore, out=out, progress=progress)
        holes, corrupt = kstore.check_tiles()
        if holes or corrupt:
            model = as_model(apply_fn)
            spec = tile_spec(kstore)
            probe = read_block(spec.x1, (0, 1), 1)
            with matmul_precision(spec.precision):
                digest, model_words = model_fingerprint(model, params, probe)
            new = {"model": digest, "params": params_digest(params)}
            check_same_job(
                {k: kstore.fields[k] for k in new},
                new,
                path,
                stored_words=kstore.spec.readable(),
                new_words={"model": model_words, "params": describe_params(params)},
            )
            # Missing tiles may still have a marker (their chunk was deleted).
            marked = kstore.markers()
            kstore.clear_tiles([t for t in holes if marked[t.i, t.j]] + corrupt)
            runner = make_executor(
                executor,
                client=client,
                scheduler=scheduler,
                workers=workers,
                x64=kstore.plan.dtype == "float64",
                stream=out,
                verbose=progress,
            )
            redo = set(holes) | set(corrupt)
            todo = [t for t in kstore.plan.tiles() if t in redo]
            run_tiles(
                kstore,
                model,
                params,
                todo,
                runner,
                progress=progress,
                out=out,
                lock=lock,
            )
        return holes, corrupt
