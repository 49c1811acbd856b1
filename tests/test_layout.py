"""The package's layout: imports point one way, and the planner stays pure."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1] / "src" / "ntkdist"
HEAVY = {"jax", "dask", "distributed", "zarr"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name | ast.Attribute)
        and "TYPE_CHECKING" in ast.unparse(node.test)
    )


def _imports(name: str, *, top_level: bool, typing: bool = True) -> set[str]:
    """Absolute names ``name`` imports (relative imports resolved): all of them,
    or only those run at import time (not in functions); ``typing=False``
    leaves out those under ``if TYPE_CHECKING``."""
    tree = ast.parse(MODULES[name].read_text())
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if (not typing and _type_checking(node)) or (
            top_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ):
            continue
        todo.extend(ast.iter_child_nodes(node))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names]
            found.update(s for s in subs if s in MODULES)
            if node.module or not all(s in MODULES for s in subs):
                found.add(module)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the ntkdist modules it imports, in functions too (a cycle
    through a deferred import is still a cycle), annotations aside."""
    return {
        m: _imports(m, top_level=False, typing=False) & MODULES.keys() for m in MODULES
    }


def test_the_import_graph_sees_relative_imports():
    assert "ntkdist._errors" in _imports("ntkdist._planner._plan", top_level=True)
    assert "ntkdist.storage._direct" in _imports(
        "ntkdist.storage._tiles", top_level=True
    )


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_planner_imports_no_jax_dask_or_zarr_even_indirectly():
    """Everything the planner imports, at any depth and in any function,
    through absolute or relative imports, is pure Python."""
    seen: set[str] = set()
    todo = [m for m in MODULES if m.startswith("ntkdist._planner")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for name in _imports(m, top_level=False):
            assert name.split(".")[0] not in HEAVY, f"{m} imports {name}"
            if name in MODULES:
                todo.append(name)
    assert "ntkdist._errors" in seen and "ntkdist._units" in seen


# Modules allowed past the limit, each with the reason and the limit it keeps.
LONG = {
    # the jaxpr walk: one recursive pass over every primitive's rule
    "ntkdist.kernels._walk": 700,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    limit = LONG.get(name, 520)
    assert lines <= limit, f"{name} has {lines} lines; split it by what it does"


def test_a_folder_named_ntkdist_beside_a_script_does_not_shadow_the_package(tmp_path):
    """A script run next to the clone (a folder called ``ntkdist`` without an
    ``__init__.py``, the repository root) imports the installed package."""
    import subprocess
    import sys

    (tmp_path / "ntkdist").symlink_to(ROOT.parents[1], target_is_directory=True)
    script = tmp_path / "use.py"
    script.write_text("import ntkdist\nprint(ntkdist.open.__module__)\n")
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ntkdist._api"


def test_a_job_run_in_process_loads_no_dask(tmp_path):
    """An in-process ``compute`` (and the store it records) needs neither
    ``dask`` nor ``distributed``: importing them would cost every small job
    about 0.1 s (dask) to 0.5 s (distributed)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, jax.numpy as jnp, ntkdist\n"
        "x = np.ones((6, 3), np.float32)\n"
        "s = ntkdist.compute(lambda p, x: jnp.tanh(x @ p), np.ones((3, 2), np.float32),"
        f" x, store={str(tmp_path / 'k.zarr')!r}, tile=3, progress=False)\n"
        "assert s.complete and s.spec.versions['dask'], s.spec.versions\n"
        "loaded = {'dask', 'distributed'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
