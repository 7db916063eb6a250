"""The package's import graph, read from the source (nothing is imported): no cycle, no import
that runs back up the package hierarchy, and mpi4py imported by the communication layer alone.

Every ``import``/``from ... import`` of an ``apts_mpi`` module counts, also one inside a function (a
deferred import hides a cycle, it does not remove it).  "Back up" means a module that imports
from a package it belongs to (``from . import __version__``, ``from .. import X`` where ``X`` is not
a module, ``import apts_mpi``): a package's ``__init__`` sits above its modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apts_mpi"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str, modules) -> bool:
    return modules[name].name == "__init__.py"


def imports(modules=None) -> dict[str, set[str]]:
    """module -> the apts_mpi modules it imports (a package stands for its ``__init__``)."""
    modules = modules or _modules()
    graph = {}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from X import m`: the submodule m if there is one
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        # `import a.b.c` names a.b.c; keep the longest known prefix
        known = set()
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t:
                known.add(t)
        graph[name] = known - {name}
    return graph


def upward_imports(graph=None, modules=None) -> list[tuple[str, str]]:
    """(module, ancestor package) pairs: a module that imports a package it belongs to."""
    modules = modules or _modules()
    graph = graph or imports(modules)
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if m.startswith(t + ".") and _is_package(t, modules))


def cycles(graph=None) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = graph or imports()
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_reader_sees_relative_absolute_and_deferred_imports():
    graph = imports()
    assert "apts_mpi.errors" in graph["apts_mpi.config"]  # from .errors import ...
    assert "apts_mpi.problems" in graph["apts_mpi.config"]  # from .problems import ...
    assert "apts_mpi.comm" in graph["apts_mpi.problems.base"]  # from ..comm import ...
    assert "apts_mpi.train" in graph["apts_mpi.cli"]  # inside a function


def test_the_cycle_finder_on_a_known_graph():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles()
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_runs_back_up_the_package():
    found = upward_imports()
    assert not found, "imports of an enclosing package: " + ", ".join(f"{m} -> {t}" for m, t in found)


def test_only_the_communication_layer_imports_mpi4py():
    """Every MPI call goes through apts_mpi/comm.py (a second backend is then one new class)."""
    modules = _modules()
    found = sorted(name for name, path in modules.items() if name != "apts_mpi.comm" and any(
        (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mpi4py" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and not node.level
            and (node.module or "").split(".")[0] == "mpi4py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))))
    assert not found, "modules importing mpi4py besides apts_mpi.comm: " + ", ".join(found)
