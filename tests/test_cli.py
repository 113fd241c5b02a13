"""The ``fedsparse`` command line: one convention for every command, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph() -> dict[str, set[str]]:
    """Every import (module level or inside a function) between the project's modules;
    a module's import of its own package (a registry's ``register``) is left out."""
    files = [*ROOT.glob("fedsparse/**/*.py"), *ROOT.glob("strategies/*.py"), *ROOT.glob("clients/*.py")]
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_the_project_modules() -> None:
    graph = _import_graph()
    assert {"fedsparse.commands.cli", "fedsparse.commands.sweep", "fedsparse.commands.drivers"} <= set(graph)
    assert "fedsparse.commands.drivers" in graph["fedsparse.commands.sweep"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_one_table_of_drivers() -> None:
    from fedsparse.commands import cli, drivers, overhead

    run_choices = {a.dest: a.choices for a in _subparser(cli.build_parser(), "run")._actions}
    assert tuple(run_choices["engine"]) == drivers.DRIVERS
    assert set(overhead.ENGINES) == {*drivers.DRIVERS, "reference"}


def _subparser(parser, name: str):
    return parser._subparsers._group_actions[0].choices[name]
