"""The package's layering: no import cycles, and methods never reach for the runtime.

A cycle makes import order matter (a half-initialised module, an ImportError that
appears only when modules load in another order) and welds layers that should be
separable; a method that imports the runtime cannot run on a node without it, nor be
listed without loading it. The graph below is read from the source with ``ast``, so it
sees every import: top level, inside functions, under ``TYPE_CHECKING``. An import by
computed name (the registry's ``importlib.import_module``) is invisible to it, which is
why the registry lives apart from the methods it lists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "fedbits"
METHODS = "fedbits.methods"
RUNTIME = "fedbits.runtime"


def _module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _owner(name: str) -> str | None:
    """The package module that ``name`` (a module, or a symbol inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The package modules that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    return _imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool) -> set[str]:
    """The package modules that ``source`` (the text of ``module``) imports.

    ``import a.b`` and ``from a.b import X`` import ``a.b``; ``from a import b`` imports
    the submodule ``a.b`` when there is one, else ``a`` (``b`` is a symbol of its
    ``__init__``). Relative imports are resolved against the module's package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(o for alias in node.names if (o := _owner(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                source_module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source_module = node.module or ""
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                target = submodule if submodule in MODULES else _owner(source_module)
                if target:
                    found.add(target)
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each given
    as one cycle through its modules, in import order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(_cycle_in(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One import cycle through ``component``'s smallest module (breadth-first back to it)."""
    start = min(component)
    paths = {w: [start, w] for w in graph[start] if w in component}
    queue = list(paths)
    while start not in paths:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return paths[start]


def test_the_graph_sees_every_kind_of_import():
    """The walk must not miss the imports a cycle hides in: function-local and relative
    ones, and a package's own symbols."""
    source = ("from . import protocol\n"
              "from ..base import ClientData\n"
              "from fedbits.methods import register\n"
              "from fedbits.zo import kernels\n"
              "import numpy\n"
              "def half():\n"
              "    import fedbits.zo.replay\n")
    assert _imports_in(source, "fedbits.methods.fedkseed.client", is_package=False) == {
        "fedbits.methods.fedkseed.protocol", "fedbits.methods.base", "fedbits.methods",
        "fedbits.zo.kernels", "fedbits.zo.replay"}
    assert "fedbits.runtime.flower.launch" in GRAPH["fedbits.runtime"]  # in run_experiment
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_package_has_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_method_imports_the_runtime():
    """Methods meet the runtime only at bytes: a method module that imports it (even
    inside a function) cannot be listed, validated or run on a node without it."""
    offenders = {m: sorted(d for d in deps if d == RUNTIME or d.startswith(RUNTIME + "."))
                 for m, deps in GRAPH.items() if m == METHODS or m.startswith(METHODS + ".")}
    assert not {m: d for m, d in offenders.items() if d}


def _builtin_method_modules() -> list[str]:
    """Each built-in method: a module or a package (with all its submodules) of
    fedbits.methods, as the registry finds them."""
    from fedbits.methods.registry import builtin_method_modules

    return builtin_method_modules()


@pytest.mark.parametrize("method", _builtin_method_modules())
def test_importing_a_method_loads_no_runtime(method):
    """What the static check promises, in a fresh interpreter: importing the method (a
    package with all its halves) leaves ``fedbits.runtime`` unloaded."""
    modules = [m for m in MODULES if m == method or m.startswith(method + ".")]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"    assert {RUNTIME!r} not in sys.modules, name + ' loaded ' + {RUNTIME!r}\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
