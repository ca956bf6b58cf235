"""The package's shape: imports go one way, modules stay small, nothing shadows the standard
library, and the tracing core does not depend on any model library.

The import graph is read from the source (every ``import`` statement, also those inside
functions, except under ``if TYPE_CHECKING:``). Importing a module also runs the ``__init__``
of each package above it that the importer is not already inside, so those count as edges too.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "i2am_fast"
MAX_LINES = 350


def _module_files() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: str) -> list[str]:
    """Every module name (absolute, any library) that ``name`` imports."""
    tree = ast.parse(open(path).read(), path)
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are not executed
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, targets in IMPORTS.items():
        edges = set()
        for target in targets:
            if target not in MODULES:
                continue
            own = set(_ancestors(name)) | {name}
            edges |= {m for m in [*_ancestors(target), target] if m in MODULES and m not in own}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read():
    """A check of this file: known edges are found (else an empty graph would pass)."""
    graph = _graph()
    assert "i2am_fast.tracing.state" in graph["i2am_fast.tracing.tracer"]
    assert "i2am_fast.adapters.base" in graph["i2am_fast.tracing.state"]
    assert "i2am_fast.readout" in graph["i2am_fast.tracing.state"]  # the package __init__ runs too
    assert "i2am_fast.tracing" not in graph["i2am_fast.tracing.tracer"]  # its own package is already running
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (directly or in a loop): " + "; ".join(map(str, cycles))


def test_no_module_over_350_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(open(path).read().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_tracing_core_imports_no_model_library():
    """The core's modules, and everything they import from the package, import no diffusers."""
    graph = _graph()
    core = [m for m in MODULES if m.startswith("i2am_fast.tracing")] + ["i2am_fast.adapters.base"]
    reached, todo = set(), list(core)
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += graph[m]
    offenders = {m: t for m in reached for t in IMPORTS[m] if t.split(".")[0] in ("diffusers", "transformers")}
    assert not offenders, f"the tracing core reaches a model library: {offenders}"
    assert not any(m.startswith("i2am_fast.adapters.diffusers") for m in reached), sorted(reached)


def test_tracing_core_imports_without_diffusers_installed():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'diffusers':\n"
        "            raise ImportError('diffusers is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import i2am_fast, i2am_fast.tracing, i2am_fast.adapters.base, i2am_fast.readout\n"
        "assert 'diffusers' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("where", [".", PACKAGE], ids=["repository-root", "inside-the-package"])
def test_cprofile_imports_from(where):
    """No module of the package shadows the standard library when its folder is first on sys.path."""
    out = subprocess.run([sys.executable, "-c", "import cProfile, pstats, profile; print(profile.__file__)"],
                         capture_output=True, text=True, cwd=os.path.join(ROOT, where))
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(ROOT) not in os.path.realpath(out.stdout.strip()), out.stdout


def test_no_pointer_outside_the_repository():
    """Code, tests, benchmarks and README point to docs/design.md, not to a file outside the
    repository or to issue numbers."""
    pattern = re.compile("SPEC" + r"\.md|\bissues? #?\d+", re.IGNORECASE)
    paths = ["README.md", "setup.py", "Makefile"]
    for folder in (PACKAGE, "tests", "benchmarks", "csrc", "examples"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.relpath(os.path.join(base, f), ROOT) for f in files
                      if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".inc", ".md"))]
    hits = []
    for rel in paths:
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            hits += [f"{rel}:{n}: {line.strip()[:80]}" for n, line in enumerate(f, 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
