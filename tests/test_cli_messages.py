"""What the command line says: refusals in values, flags not keywords, inputs, help.

Each CLI test runs the real ``python -m ntkdist`` in a subprocess on a model
file and real Zarr stores in ``tmp_path``, with the serial executor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import ntkdist
from ntkdist._cli import build_parser
from ntkdist._cli._load import canonical_model_spec, load_model, split_model_spec
from ntkdist._cli._messages import cli_message
from ntkdist._errors import InputError, ResumeMismatchError
from ntkdist.storage import StoreSpec

MODEL_FILE = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np

    def make(width=8, seed=0):
        rng = np.random.default_rng(seed)
        p = {"w": rng.normal(size=(3, width)).astype(np.float32),
             "v": (rng.normal(size=(width, 2)) / 4).astype(np.float32)}
        return (lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]), p

    def embed():
        table = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
        p = {"a": np.ones((2, 2), np.float32)}
        return (lambda p, x: jnp.asarray(table)[x[:, 0]] @ p["a"]), p
""")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    changed = x.copy()
    changed[7, 1] += 1.0
    np.save(tmp_path / "x7.npy", changed)
    nan = x.copy()
    nan[15, 2] = np.nan
    np.save(tmp_path / "xnan.npy", nan)
    np.save(tmp_path / "ids.npy", np.arange(20).reshape(20, 1) % 10)
    np.savez(tmp_path / "split.npz", xtr=x, ytr=np.arange(20) % 2, xte=x[:5])
    return tmp_path


def ntk(files, *args, ok=True):
    """Run ``python -m ntkdist ARGS`` in ``files``; its stdout (and stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-m", "ntkdist", *args],
        cwd=files,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout, r.stderr


def compute(files, *extra, ok=True, out="k.zarr"):
    return ntk(
        files,
        "compute",
        "model.py:make",
        "--x1",
        "x.npy",
        "--out",
        out,
        "--executor",
        "serial",
        "--quiet",
        *extra,
        ok=ok,
    )


# -- 3. a refused resume names values; status shows the job ----------------------


def test_refused_resume_shows_values_not_hashes(files):
    compute(files, "--output", "trace", "--tile", "8")
    _, err = compute(
        files, "--output", "pntk", "--tile", "4", "--precision", "high", ok=False
    )
    assert "output (stored trace; now pntk)" in err
    assert "tile (stored 8x8; now 4x4)" in err
    assert "precision (stored highest; now high)" in err
    assert "pass --overwrite" in err and "overwrite=True" not in err
    # Another input of the same shape: the first row that differs.
    _, err = compute(
        files, "--output", "trace", "--tile", "8", "--x1", "x7.npy", ok=False
    )
    assert (
        "x1 (stored float32 [20, 3]; now float32 [20, 3]; first differing row 7)" in err
    )
    # Another width: the params' leaves and sums.
    _, err = compute(
        files, "--output", "trace", "--tile", "8", "--model-arg", "width=4", ok=False
    )
    assert (
        "params (stored 2 leaves ['v'] float32 [8, 2], ['w'] float32 [3, 8], sum" in err
    )
    assert "now 2 leaves ['v'] float32 [4, 2], ['w'] float32 [3, 4], sum" in err


def test_status_shows_the_job_and_nothing_left_on_a_finished_store(files):
    compute(files, "--output", "trace", "--tile", "8")
    out, _ = ntk(files, "status", "k.zarr")
    assert "progress     6/6 tiles (100%) complete" in out
    assert "tiles to compute" not in out
    assert "6 in all, 6 done, complete" in out
    for line in (
        "  output     trace",
        "  tile       8x8",
        "  dtype      float32",
        "  precision  highest",
        "  x1         float32 [20, 3] (copied into the store, inputs/x1)",
        "  x2         symmetric",
        "  params     2 leaves ['v'] float32 [8, 2], ['w'] float32 [3, 8], sum",
    ):
        assert line in out, out
    assert f"model        {files}/model.py:make\n" in out
    data = json.loads(ntk(files, "status", "k.zarr", "--json")[0])
    assert data["complete"] and data["job"]["output"] == "trace"
    assert data["job"]["tile"] == "8x8" and data["job"]["x1"] == "float32 [20, 3]"
    assert data["inputs"]["x1"]["shape"] == [20, 3]
    assert data["model_spec"] == f"{files}/model.py:make"
    assert data["fields"]["output"] != "trace"  # the hashes stay


def test_a_store_without_descriptions_reads_its_values_from_the_spec(files):
    """Stores written before descriptions were recorded: values from the spec,
    hashes for model and params."""
    compute(files, "--output", "trace", "--tile", "8")
    group = zarr.open_group(str(files / "k.zarr"), mode="r+")
    attrs = dict(group.attrs["ntkdist"])
    del attrs["described"]
    group.attrs["ntkdist"] = attrs
    readable = StoreSpec.from_json(attrs).readable()
    assert readable["output"] == "trace" and readable["tile"] == "8x8"
    assert readable["x1"] == "float32 [20, 3]"
    assert readable["params"] == attrs["fields"]["params"]  # the hash
    _, err = compute(files, "--output", "pntk", "--tile", "8", ok=False)
    assert "output (stored trace; now pntk)" in err
    out, _ = ntk(files, "status", "k.zarr")
    assert "  output     trace" in out


def test_python_api_refusal_carries_both_values_and_keyword(files, tmp_path):
    import jax.numpy as jnp

    def f(p, x):
        return jnp.tanh(x @ p)

    x = np.load(files / "x.npy").astype(np.float64)
    p = np.ones((3, 2))
    ntkdist.compute(
        f, p, x, store=tmp_path / "s", output="trace", executor="serial", progress=False
    )
    with pytest.raises(ResumeMismatchError) as info:
        ntkdist.compute(
            f,
            p,
            x,
            store=tmp_path / "s",
            output="diagonal",
            executor="serial",
            progress=False,
        )
    msg = str(info.value)
    assert "output (stored trace; now diagonal)" in msg
    assert "overwrite=True" in msg and "overwrite=True" in info.value.keywords
    assert "pass --overwrite to discard" in cli_message(info.value)


# -- 4. flags, not Python keywords; the rows that hold NaN ------------------------


def test_nan_refusal_names_the_rows_and_the_flag(files):
    _, err = compute(files, "--x1", "xnan.npy", ok=False)
    assert "x1 rows 15 (1 row of 20) hold NaN or inf" in err
    assert "--allow-nonfinite" in err and "check_finite" not in err
    compute(files, "--x1", "xnan.npy", "--allow-nonfinite", "--tile", "10")
    k = ntkdist.open(files / "k.zarr").kernel[...]
    assert np.isnan(k[15]).all() and np.isfinite(k[:15, :15]).all()


def test_integer_refusal_names_the_flag(files):
    args = ["plan", "model.py:embed", "--x1", "ids.npy", "--no-probe"]
    _, err = ntk(files, *args, ok=False)
    assert "--integer-inputs" in err and "integer_inputs" not in err
    out, _ = ntk(files, *args, "--integer-inputs")
    assert "tiles to compute" in out


def test_nan_rows_in_the_python_api():
    x = np.ones((30, 3))
    x[[3, 9, 11, 12, 20, 21, 29]] = np.nan
    x[29, 0] = np.inf  # a row with NaN and inf counts once
    with pytest.raises(InputError) as info:
        ntkdist.ntk(lambda p, x: x @ p, np.ones((3, 2)), x)
    assert "x1 rows 3, 9, 11, 12, 20, ... (7 rows of 30) hold NaN or inf" in str(
        info.value
    )
    assert info.value.keywords == ("check_finite=False",)
    big = np.ones((1797, 4))
    big[1500, 2] = np.nan
    with pytest.raises(InputError, match=r"x2 rows 1500 \(1 row of 1797\)"):
        ntkdist.plan(lambda p, x: x @ p, np.ones((4, 2)), big[:10], big, probe=False)


def test_cli_message_maps_keywords_to_flags():
    err = InputError(
        "pass check_finite=False, integer_inputs=True or overwrite=True "
        "(CLI: --overwrite); memory_budget=1.0 MiB is too small; strategy='auto'",
        keywords=["check_finite=False"],
    )
    assert cli_message(err) == (
        "pass --allow-nonfinite, --integer-inputs or --overwrite; "
        "--memory-budget 1.0 MiB is too small; --strategy auto"
    )
    assert "check_finite=False" in str(err)  # the Python message is unchanged


# -- 5. one input loader, clear messages ------------------------------------------


@pytest.mark.slow  # 12 s: a dozen CLI processes
def test_every_input_takes_npz_key_and_fails_clearly(files):
    compute(files, "--x1", "split.npz:xtr", "--output", "trace", "--tile", "10")
    base = [
        "regress",
        "--train-kernel",
        "k.zarr",
        "--cross-kernel",
        "k.zarr",
        "--ridge",
        "1e-3",
        "--out",
        "p.npz",
    ]
    out, _ = ntk(
        files, *base, "--labels", "split.npz:ytr", "--test-labels", "split.npz:ytr"
    )
    assert "predictions (1, 20, 2) saved to p.npz" in out
    _, err = ntk(files, *base, "--labels", "nope.npy", ok=False)
    assert "--labels nope.npy: no such file or directory" in err
    assert str(files / "nope.npy") in err
    _, err = ntk(files, *base, "--labels", "split.npz", ok=False)
    assert (
        "--labels split.npz holds 3 arrays (xtr, ytr, xte); name one as "
        "split.npz:KEY, e.g. --labels split.npz:xtr." in err
    )
    _, err = ntk(files, *base, "--labels", "split.npz:y", ok=False)
    assert (
        "--labels split.npz:y: split.npz has no array 'y'; it holds xtr, ytr, xte"
        in err
    )
    _, err = ntk(
        files, "plan", "model.py:make", "--x1", "split.npz", "--no-probe", ok=False
    )
    assert "--x1 split.npz holds 3 arrays" in err
    _, err = ntk(files, "spectrum", "nothere.zarr", ok=False)
    assert "STORE nothere.zarr: no such kernel store or file" in err


# -- 7. help texts ------------------------------------------------------------------


def _actions(parser, name="ntkdist"):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _actions(p, f"{name} {sub}")
            continue
        yield name, parser, action


def test_every_option_has_help_without_backticks():
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, _, a in _actions(build_parser())
        if not (a.help or "").strip()
    ]
    assert not missing, missing
    ticks = [
        f"{name} {a.option_strings or a.dest}"
        for name, _, a in _actions(build_parser())
        if "``" in (a.help or "")
    ]
    assert not ticks, ticks
    for name, parser, _ in _actions(build_parser()):
        assert "``" not in parser.format_help(), name


def test_choices_are_offered_and_precision_documented(files):
    compute_parser = next(
        p for name, p, _ in _actions(build_parser()) if name == "ntkdist compute"
    )
    by_flag = {
        a.option_strings[0]: a for a in compute_parser._actions if a.option_strings
    }
    assert set(by_flag["--strategy"].choices) == {"auto", *ntkdist.kernels.STRATEGIES}
    for choice in by_flag["--precision"].choices:
        assert choice in by_flag["--precision"].help
    out, _ = ntk(files, "bench", "--help")
    assert "``" not in out
    _, err = ntk(
        files,
        "plan",
        "model.py:make",
        "--x1",
        "x.npy",
        "--strategy",
        "fastest",
        ok=False,
    )
    assert "invalid choice: 'fastest'" in err and "'structured'" in err


# -- 8. --model-arg ----------------------------------------------------------------


def test_model_args_reach_the_factory_and_the_store(files):
    compute(
        files,
        "--model-arg",
        "width=4",
        "--model-arg",
        "seed=2",
        "--output",
        "trace",
        "--tile",
        "10",
    )
    store = ntkdist.open(files / "k.zarr")
    assert store.spec.model_spec == f"{files}/model.py:make(width=4, seed=2)"
    assert "['w'] float32 [3, 4]" in store.spec.readable()["params"]
    # Resume with the same arguments: nothing to do.
    compute(
        files,
        "--model-arg",
        "seed=2",
        "--model-arg",
        "width=4",
        "--output",
        "trace",
        "--tile",
        "10",
    )
    # verify --repair reloads the recorded model (width 4), so it passes.
    group = zarr.open_group(str(files / "k.zarr"), mode="r+")
    group["done"][0, 1] = 0
    out, _ = ntk(files, "verify", "k.zarr", "--repair", "--quiet")
    assert "after repair: 0 missing, 0 corrupt" in out


def test_bad_model_args_are_clear(files):
    _, err = compute(files, "--model-arg", "depth=3", ok=False)
    assert (
        "MODEL factory 'model.py:make' takes no keyword argument 'depth' "
        "(given by --model-arg depth=...); its signature is make(width=8, seed=0)."
    ) in err
    _, err = compute(files, "--model-arg", "width", ok=False)
    assert "argument --model-arg: 'width' is not KEY=VALUE" in err


def test_model_spec_calls_round_trip(files):
    spec = canonical_model_spec(
        str(files / "model.py:make"), {"width": 4, "act": "relu", "sizes": [1, 2]}
    )
    assert spec == f"{files}/model.py:make(width=4, act='relu', sizes=[1, 2])"
    assert split_model_spec(spec) == (
        f"{files}/model.py:make",
        {"width": 4, "act": "relu", "sizes": [1, 2]},
    )
    _, params = load_model(f"{files}/model.py:make(width=5)")
    assert params["w"].shape == (3, 5)
    _, params = load_model(f"{files}/model.py:make(width=5)", {"width": 6})
    assert params["w"].shape == (3, 6)
    with pytest.raises(InputError, match="not KEY=VALUE pairs of Python literals"):
        load_model(f"{files}/model.py:make(5)")


# -- units: descriptions and the refusal's words ------------------------------------


def test_first_differing_row_and_descriptions():
    from ntkdist.storage._fingerprint import (
        check_same_job,
        describe_array,
        describe_params,
        first_differing_row,
    )

    a = np.zeros((9, 2))
    a[4, 1] = np.nan
    b = a.copy()
    assert first_differing_row(a, b) is None  # NaN in the same place is equal
    b[6, 0] = 1.0
    assert first_differing_row(a, b) == 6
    assert describe_array(a) == "float64 [9, 2]"
    many = {f"l{i}": np.ones(2) for i in range(8)}
    assert describe_params(many).startswith("8 leaves ['l0'] float64 [2], ")
    assert describe_params(many).endswith("and 2 more, sum 16")
    stored, new = {"x1": "h1", "output": "o1"}, {"x1": "h2", "output": "o1"}
    words = {"x1": "float64 [9, 2]", "output": "full"}
    with pytest.raises(ResumeMismatchError) as info:
        check_same_job(
            stored,
            new,
            "s",
            stored_words=words,
            new_words=words,
            arrays={"x1": (a, b)},
        )
    assert "x1 (stored float64 [9, 2]; now float64 [9, 2]; first differing row 6)" in (
        str(info.value)
    )
    with pytest.raises(ResumeMismatchError, match=r"x1 \(stored h1, now h2\)"):
        check_same_job(stored, new, "s")  # no words: the hashes, as before


def test_repair_with_other_params_is_refused_in_values(files):
    """``repair`` given params that are not the store's says what they are."""
    import shutil

    import jax.numpy as jnp

    from ntkdist._api import repair

    fn, params = load_model(f"{files}/model.py:make")
    x = np.load(files / "x.npy")
    path = files / "r.zarr"
    ntkdist.compute(
        fn, params, x, store=path, tile=8, executor="serial", progress=False
    )
    shutil.rmtree(path / "kernel" / "c" / "0" / "0")  # one tile's chunk is gone
    other = {k: jnp.asarray(v) * 2 for k, v in params.items()}
    with pytest.raises(ResumeMismatchError) as err:
        repair(path, fn, other, executor="serial", progress=False)
    text = str(err.value)
    assert "params (stored 2 leaves" in text and "float32 [3, 8]" in text, text
    assert "sum" in text
