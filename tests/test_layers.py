"""The layers of docs/architecture.md, as the imports show them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "fedsparse"
COMMANDS = LIBRARY / "commands"
FLOWER_IN_LIBRARY = {"fedsparse/protocol.py"}  # wire_bytes: the serialized size of a Flower message


def imports(path: Path) -> set[str]:
    """Top-level module names ``path`` imports (anywhere in the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def library_modules() -> list[Path]:
    return [p for p in LIBRARY.rglob("*.py") if COMMANDS not in p.parents]


def test_no_library_module_imports_the_flower_glue():
    offenders = {str(p.relative_to(ROOT)): sorted(imports(p) & {"strategies", "clients"}) for p in library_modules()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_library_imports_flower_only_to_measure_messages():
    users = {str(p.relative_to(ROOT)) for p in library_modules() if "flwr" in imports(p)}
    assert users <= FLOWER_IN_LIBRARY, users


def test_the_glue_stays_out_of_each_other_except_the_launchers():
    """The server side never imports the client side, except the two drivers that start both
    sides in one process (the Simulation Engine launcher and the in-process driver)."""
    for path in (ROOT / "strategies").glob("*.py"):
        if path.name not in ("in_process.py", "simulation.py"):
            assert "clients" not in imports(path), path.name
    for path in (ROOT / "clients").glob("*.py"):
        assert "strategies" not in imports(path), path.name
