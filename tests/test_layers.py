"""Layers: no import cycle between arrtune's modules (function-level imports included), and none between
the packages ``data`` and ``evaluation`` (generation lives below both, in ``arrtune.generation``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "arrtune"


def import_graph() -> dict[str, set[str]]:
    """module -> the arrtune modules it imports, anywhere in its source."""
    modules = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("arrtune", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("arrtune"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    # the lazy exports of arrtune/__init__.py are not imports
    assert cycles(graph) == []


def test_no_cycle_between_the_data_and_evaluation_packages() -> None:
    graph = import_graph()

    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 else module

    uses = {(package(a), package(b)) for a, targets in graph.items() for b in targets}
    assert ("evaluation", "data") in uses  # evaluation reads the data it scores
    assert ("data", "evaluation") not in uses


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
