"""The package's shape: imports run one way between the rooms, no module cycle, and no torch below modeling.

Read from the source with ``ast`` (imports inside functions included), so a lazy import cannot hide
an upward edge or a cycle. The rooms and their order (ARCHITECTURE.md): ``core`` <- ``inference`` <-
``api`` | ``app`` | ``dicom`` | ``evaluation`` <- ``modeling`` <- ``cli``; the three surfaces and the
evaluation do not import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pneumo

SRC = Path(pneumo.__file__).parent
RANK = {"core": 0, "inference": 1, "api": 2, "app": 2, "dicom": 2, "evaluation": 2, "modeling": 3, "cli": 4}


def _module_name(path: Path) -> str:
    parts = ["pneumo", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every pneumo module ``path`` imports, anywhere in the file (``from X import name`` of a submodule counts it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pneumo"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumo"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return {name for name in found if name in MODULES and name != "pneumo"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


EDGES = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_lives_in_a_room() -> None:
    assert {name for name in MODULES if name != "pneumo" and _room(name) is None} == set()


def test_imports_run_one_way_between_rooms() -> None:
    wrong = []
    for module, targets in EDGES.items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if room is None or other is None or other == room:
                continue
            if RANK[other] >= RANK[room]:  # upward, or sideways between the surfaces and the evaluation
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    """Tarjan's strongly connected components over module imports; a package's ``__init__`` counts as a module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in EDGES[node]:
            # A package imports its own submodules in its __init__ (its public face): not a cycle of code.
            if node == target or target.startswith(node + "."):
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for module in EDGES:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("package", ["pneumo.inference", "pneumo.api", "pneumo.app", "pneumo.dicom", "pneumo.cli"])
def test_serving_packages_import_no_torch(package: str) -> None:
    """What a serving node loads (and ``pneumo --help``) never pulls in torch or the training code."""
    training = "m == 'torch' or m.startswith('pneumo.modeling.') and m != 'pneumo.modeling.config'"
    loaded = f"sorted(m for m in sys.modules if {training})"
    code = f"import sys, {package}; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
