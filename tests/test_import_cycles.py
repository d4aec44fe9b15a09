"""No import circles: no module of a package imports (directly or through others) a module that imports it
back. Read from the source with ``ast``, every ``import`` statement counted, the ones inside functions too
(a lazy import still ties the two modules together); imports of names given as strings (``importlib``) are
not seen. Run it by hand for the circles themselves: ``python tests/test_import_cycles.py``.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """module → the modules of ``package`` it imports. ``from a import b`` names ``a.b`` when that is a module
    of the package, else ``a``; importing a submodule is not counted as importing its parent packages (every
    module would then import the package's ``__init__``)."""
    files = {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    arrows = [f"{a} → {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(arrows)


def test_checker_finds_a_circle_and_reads_relative_imports():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    bench = import_graph("benchmarks")
    assert "benchmarks.runner" in bench["benchmarks.quality"]  # from .runner import ...
    assert "benchmarks.problems.toy" in bench["benchmarks.quality"]  # from .problems import toy (lazy)
    assert "benchmarks.problems" in bench["benchmarks.problems.recsys"]  # from . import MultiHeadModel


def test_benchmarks_have_no_import_circle():
    graph = import_graph("benchmarks")
    assert not cycles(graph), "\n".join(describe(graph, c) for c in cycles(graph))


def test_gradsurgery_has_no_import_circle():
    graph = import_graph("gradsurgery")
    assert not cycles(graph), "\n".join(describe(graph, c) for c in cycles(graph))


if __name__ == "__main__":
    for package in ("gradsurgery", "benchmarks"):
        g = import_graph(package)
        print(f"{package}: " + ("no circle" if not cycles(g) else ""))
        for c in cycles(g):
            print("  " + describe(g, c))
