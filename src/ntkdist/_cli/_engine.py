"""The ``ntkdist`` command line: compute, plan, status, verify.

Parsing and printing only; the work is in :mod:`ntkdist._api`.

MODEL is ``path/to/file.py:factory`` or ``package.module:factory``, where
``factory(**model_args)`` returns ``(apply_fn, params)``. Inputs are ``.npy``
files, ``.npz`` files with a key (``data.npz:x``), or Zarr array paths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from .._errors import InputError, NtkdistError
from .._planner import CACHE_LEVELS
from ..kernels import STRATEGIES
from ._load import (
    _enable_x64_for,
    canonical_model_spec,
    load_input,
    load_model,
    model_arg,
)
from ._messages import in_cli_words

EXIT_ERROR = 2
EXIT_PROBLEMS = 1


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="path/to/file.py:factory or package.module:factory; "
        "factory(**model args) returns (apply_fn, params)",
    )
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        type=model_arg,
        metavar="KEY=VALUE",
        help="keyword argument for the MODEL factory (repeatable), e.g. "
        "--model-arg width=512 --model-arg ckpt=run3.npz; VALUE is read as a "
        "Python literal (number, string, list, True/None), else taken as a string; "
        "recorded in the store so verify --repair reloads the same model",
    )
    p.add_argument(
        "--x1",
        required=True,
        help="inputs [n, *features]: x.npy, x.npz:KEY or a Zarr array directory",
    )
    p.add_argument(
        "--x2",
        help="second inputs, same forms as --x1 (default: x2 = x1, symmetric)",
    )
    p.add_argument(
        "--output",
        default="full",
        choices=["full", "trace", "diagonal", "pntk"],
        help="full Θ[i,j,a,b]; trace (1/O)Σ_a Θ[i,j,a,a]; diagonal "
        "Θ[i,j,a,a]; pntk (1/O)Σ_aΣ_b Θ[i,j,a,b]",
    )
    p.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", *STRATEGIES],
        help="how a tile is computed; auto (the default) picks the cheapest "
        "that the model supports",
    )
    p.add_argument("--tile", type=int, help="tile side in samples (one Zarr chunk)")
    p.add_argument("--memory-budget", help="peak memory per worker, e.g. 2GiB")
    p.add_argument(
        "--cache",
        default="auto",
        choices=["auto", *CACHE_LEVELS],
        help="where input blocks' factors are kept between tiles: each worker's "
        "memory, a Zarr factor store inside the kernel store, or nowhere "
        "(recomputed); auto: the plan's predicted fastest",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes of the embedded cluster (default: one per GPU, "
        "else one per core)",
    )
    p.add_argument(
        "--precision",
        default="highest",
        choices=["highest", "high", "default", "tensorfloat32", "bfloat16"],
        help="float32 matmul precision on GPUs/TPUs: highest (true float32, the "
        "default); high (intermediate: TF32 on NVIDIA GPUs, 3 bfloat16 passes on "
        "TPUs); tensorfloat32 (TF32 on NVIDIA GPUs since Ampere); default (JAX's "
        "own default, the hardware's fastest: TF32 on such GPUs, one bfloat16 "
        "pass on TPUs); bfloat16 (one bfloat16 pass, fastest, least precise). "
        "No effect on CPUs or float64",
    )
    p.add_argument(
        "--integer-inputs",
        action="store_true",
        help="allow integer inputs (token or class ids)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="compute even if params or inputs hold NaN or inf (their kernel "
        "rows are NaN); by default such inputs are refused",
    )
    p.add_argument(
        "--no-independence-check",
        action="store_true",
        help="skip checking that a sample's output does not depend on the "
        "other samples in its batch (batch-norm statistics, attention across "
        "the batch)",
    )


def _exec_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="join an existing Dask cluster at this scheduler address",
    )
    p.add_argument(
        "--executor",
        choices=["auto", "dask", "serial"],
        default=default,
        help=f"where tiles run (default {default}; auto: in this process when "
        "the plan predicts under 20 s of tiles, less than a cluster's start-up, "
        "else on a Dask cluster; --workers or --scheduler mean a cluster)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkdist`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ntkdist", description="Finite-width empirical NTK over whole datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compute", help="compute a kernel into a Zarr store (resumes)")
    _job_args(c)
    c.add_argument("--out", required=True, metavar="STORE", help="Zarr store path")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a store of a different job and start over",
    )
    _exec_args(c, "auto")
    c.set_defaults(func=in_cli_words(_cmd_compute))
    p = sub.add_parser("plan", help="print the plan of a job without computing")
    _job_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="skip compiling the tile (memory from the cost model) and timing a probe",
    )
    p.set_defaults(func=in_cli_words(_cmd_plan))
    s = sub.add_parser("status", help="progress, job, fingerprint and plan of a store")
    s.add_argument("store", metavar="STORE", help="the kernel store (Zarr) to describe")
    s.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: progress, the job's fields, fingerprint, plan",
    )
    s.set_defaults(func=in_cli_words(_cmd_status))
    v = sub.add_parser("verify", help="re-check every tile's checksum")
    v.add_argument("store", metavar="STORE", help="the kernel store (Zarr) to check")
    v.add_argument(
        "--repair",
        action="store_true",
        help="recompute exactly the missing and corrupt tiles",
    )
    v.add_argument(
        "--model",
        help="MODEL spec overriding the one recorded in the store (with "
        "--repair); factory arguments as for compute: file.py:make(width=512)",
    )
    v.add_argument(
        "--workers",
        type=int,
        help="worker processes of the embedded cluster that --repair "
        "recomputes on (default: one per GPU, else one per core)",
    )
    _exec_args(v, "serial")
    v.set_defaults(func=in_cli_words(_cmd_verify))
    from . import _bench, _consume, _plot

    _consume.register(sub)
    _plot.register(sub)
    _bench.register(sub)
    return parser


def _cmd_compute(args: argparse.Namespace) -> int:
    from .._api import compute

    x1 = load_input(args.x1, "--x1")
    x2 = None if args.x2 is None else load_input(args.x2, "--x2")
    _enable_x64_for(x1)
    apply_fn, params = load_model(args.model, dict(args.model_arg))
    store = compute(
        apply_fn,
        params,
        x1,
        x2,
        store=args.out,
        output=args.output,
        strategy=args.strategy,
        tile=args.tile,
        memory_budget=args.memory_budget,
        cache=args.cache,
        scheduler=args.scheduler,
        workers=args.workers,
        executor=args.executor,
        overwrite=args.overwrite,
        progress=not args.quiet,
        model_spec=canonical_model_spec(args.model, dict(args.model_arg)),
        **_checks(args),
        precision=args.precision,
    )
    print(f"kernel {store.output} {store.kernel.shape} written to {store.path}")
    print(f"open it with: ntkdist.open({store.path!r}).kernel  (or .to_dask())")
    return 0


def _checks(args: argparse.Namespace) -> dict[str, bool]:
    """The input checks a job's flags ask for, as ``compute``'s keywords."""
    return {
        "integer_inputs": args.integer_inputs,
        "check_finite": not args.allow_nonfinite,
        "check_independence": not args.no_independence_check,
    }


def _cmd_plan(args: argparse.Namespace) -> int:
    from .._api import plan

    x1 = load_input(args.x1, "--x1")
    x2 = None if args.x2 is None else load_input(args.x2, "--x2")
    _enable_x64_for(x1)
    apply_fn, params = load_model(args.model, dict(args.model_arg))
    the_plan = plan(
        apply_fn,
        params,
        x1,
        x2,
        output=args.output,
        strategy=args.strategy,
        tile=args.tile,
        memory_budget=args.memory_budget,
        workers=args.workers,
        probe=not args.no_probe,
        cache=args.cache,
        precision=args.precision,
        **_checks(args),
    )
    print(the_plan.to_json() if args.json else the_plan)
    if not args.json and args.workers is None:
        from .._auto import where_compute_runs

        where = where_compute_runs(the_plan)
        if where:
            print(where)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .._api import open as open_store

    store = open_store(args.store)
    done, total = store.progress()
    job = store.spec.readable()
    if args.json:
        print(
            json.dumps(
                {
                    "done": done,
                    "total": total,
                    "complete": done == total,
                    "job": job,
                    "model_spec": store.spec.model_spec,
                    "model_name": store.spec.model_name,
                    "inputs": {
                        k: None if v is None else v.to_json()
                        for k, v in store.spec.inputs.items()
                    },
                    "fingerprint": store.fingerprint,
                    "fields": store.fields,
                    "plan": json.loads(store.plan.to_json()),
                }
            )
        )
        return 0
    print(f"store        {store.path}")
    print(
        f"progress     {done}/{total} tiles ({100 * done / max(1, total):.0f}%)"
        + (" complete" if done == total else f", {total - done} to compute")
    )
    print(f"lock         {_lock_words(store.path)}")
    print(f"model        {store.spec.model_spec or store.spec.model_name}")
    print("job          (what the fingerprint covers; hashes: status --json)")
    for k, v in job.items():
        where = _input_words(store, k)
        print(f"  {k:<10} {v}" + (f" ({where})" if where else ""))
    print(f"fingerprint  {store.fingerprint}")
    print(_tiles_line(str(store.plan), done, total))
    return 0


def _input_words(store: Any, name: str) -> str:
    """Where the store's input ``name`` is read from, for ``status``."""
    record = store.spec.inputs.get(name)
    if record is None:
        return ""
    if not record.root:
        return f"copied into the store, {record.path}"
    return f"read from {record.root}" + (f" at {record.path}" if record.path else "")


def _tiles_line(plan_text: str, done: int, total: int) -> str:
    """The plan's text with its tiles line saying what is left, not the plan's
    total ("tiles to compute 6" of a finished store)."""
    left = "complete" if done == total else f"{total - done} to compute"
    line = f"{'tiles':<20}{total} in all, {done} done, {left}"
    return re.sub(r"^tiles to compute\s+\d+", line, plan_text, flags=re.M)


def _lock_words(path: str) -> str:
    """The store's lock as ``status`` shows it."""
    from ..storage import StoreLock, is_url

    if is_url(path):
        return "none (object store)"
    lock = StoreLock(path)
    state, words = lock.state()
    if state == "free":
        return "free"
    if state == "held":
        return f"held by {words} ({lock.path})"
    if state == "dead":
        return f"stale (holder dead): {words}; the next job takes it over"
    return f"stale (holder silent): {words}; the next job takes it over"


def _cmd_verify(args: argparse.Namespace) -> int:
    from .._api import open as open_store, repair

    store = open_store(args.store)
    holes, corrupt = store.check_tiles()
    partial = store.partial_files()
    print(
        f"{store.path}: {store.plan.n_tiles} tiles, {len(holes)} missing, "
        f"{len(corrupt)} corrupt"
        + (f", {len(partial)} unfinished chunk writes (*.partial)" if partial else "")
    )
    marked = store.markers()
    gone = [t for t in holes if marked[t.i, t.j]]
    for t in gone[:20]:
        print(
            f"  missing tile {t.key} (rows {t.rows[0]}:{t.rows[1]}, "
            f"cols {t.cols[0]}:{t.cols[1]}): marked done, its chunk file is gone"
        )
    for t in corrupt[:20]:
        print(
            f"  corrupt tile {t.key} (rows {t.rows[0]}:{t.rows[1]}, "
            f"cols {t.cols[0]}:{t.cols[1]})"
        )
    for f in partial[:20]:
        print(f"  unfinished chunk write {f} (a killed job's; --repair removes it)")
    if not args.repair:
        return EXIT_PROBLEMS if holes or corrupt or partial else 0
    if not holes and not corrupt:
        if partial:
            from .._run import locked

            with locked(store.path):
                n = len(store.remove_partial_files())
            print(f"removed {n} unfinished chunk write(s)")
        return 0
    spec = args.model or store.spec.model_spec
    if not spec:
        raise InputError(
            f"the store at {store.path} records no MODEL spec; pass "
            "--model path/to/file.py:factory to repair it."
        )
    if store.plan.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    apply_fn, params = load_model(spec)
    repair(
        store.path,
        apply_fn,
        params,
        scheduler=args.scheduler,
        workers=args.workers,
        executor=args.executor,
        progress=not args.quiet,
    )
    holes, corrupt = open_store(args.store).check_tiles()
    print(f"after repair: {len(holes)} missing, {len(corrupt)} corrupt")
    return EXIT_PROBLEMS if holes or corrupt else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    # This process only checks, plans and coordinates; on a GPU node its JAX
    # must not reserve most of the device that the workers compute on.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "bench":
        # Its in-process reference loops must allocate as the workers do.
        from .._hugepages import reexec_with_huge_pages

        reexec_with_huge_pages()
    from .._interrupt import interrupt_on_signals

    with interrupt_on_signals() as signals:
        try:
            rc = args.func(args)
            return 0 if rc is None else int(rc)
        except NtkdistError as err:
            print(f"ntkdist {args.command}: error: {err}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stopped, not crashed
            import logging

            logging.disable(logging.CRITICAL)  # Dask's leftovers, until exit
            _say_interrupted(args)
            return signals.exit_status()


def script() -> None:
    """The ``ntkdist`` console script (and ``python -m ntkdist``): :func:`main`,
    then exit with its status.

    With JAX loaded, the interpreter's final garbage collections walk every
    object the command made, about 0.4 s on a small job. Frozen, they skip
    them; exit handlers, flushing and thread joins run as usual, and the
    memory goes back with the process.
    """
    import gc

    rc = main()
    gc.disable()
    gc.freeze()
    sys.exit(rc)


def _say_interrupted(args: argparse.Namespace) -> None:
    """One line after Ctrl-C or SIGTERM: what is on disk, and how to go on."""
    from .._interrupt import interrupted_message

    path = getattr(args, "out", None) if args.command == "compute" else None
    text = interrupted_message(path) if path else "interrupted."
    start = "\n" if sys.stderr.isatty() else ""  # end a progress line first
    print(f"{start}ntkdist {args.command}: {text}", file=sys.stderr, flush=True)
    # That line is the last word: Dask's exit handlers, closing a cluster
    # interrupted while it started, would add tracebacks after it.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open until exit)


if __name__ == "__main__":
    sys.exit(main())
