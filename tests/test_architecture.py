"""The package's shape: dependencies point one way, no import circles, no work at import time."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "d2"

# layer -> layers it may import (besides itself, d2.config, d2.env, d2.lifecycle, d2.utils, d2.validation;
# d2.lifecycle, the process's Prefect server and signal handling, imports no d2 module at all):
# nothing below flows imports flows, nothing below execution imports execution, stages / eval / world never
# import train, execution or flows, train never imports execution
ALLOWED = {
    "stages": {"stages", "eval"},
    "eval": {"eval", "stages"},
    "world": {"world", "stages", "eval"},
    "train": {"train", "stages", "eval", "world"},
    "execution": {"execution", "stages", "eval", "world"},
    "reports": {"reports", "stages", "eval"},  # pages and tables over a run folder's files
    "flows": {"flows", "execution", "stages", "eval", "world", "reports"},
    "preflight": {"execution", "world"},  # beside the CLI, its only caller: the stage cache's keys, never the flows
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """d2 module -> d2 modules it imports anywhere in its file (inside functions too)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for n in names:
                while n and n not in modules:
                    n = n.rpartition(".")[0]
                if n and n != name and n.startswith("d2"):
                    found.add(n)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = import_graph()
    # packages import their own submodules for re-export; a circle through an __init__ is still one
    assert cycles(graph) == []


def test_dependencies_point_one_way():
    bad = []
    for mod, deps in import_graph().items():
        layer = mod.split(".")[1] if mod.count(".") >= 1 else ""
        if layer not in ALLOWED:
            continue
        for dep in deps:
            dep_layer = dep.split(".")[1] if dep.count(".") >= 1 else ""
            if dep_layer in ("config", "env", "lifecycle", "utils", "validation", ""):
                continue
            if dep_layer not in ALLOWED[layer]:
                bad.append(f"{mod} -> {dep}")
    assert bad == []
    assert import_graph()["d2.lifecycle"] == set()  # below every layer


def test_no_environment_set_at_import():
    """Only entry points set the environment (the CLI's main, scripts): no module's top level
    calls setup_env or writes os.environ."""
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            text = ast.unparse(node)
            if "setup_env(" in text or "os.environ[" in text and "=" in text or "environ.setdefault(" in text:
                offenders.append(f"{path.relative_to(PKG)}: {text[:80]}")
    assert offenders == []
