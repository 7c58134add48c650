"""
The house rules of docs/architecture.md, checked on the source: each folder
imports only from folders below it, modules stay small, and the SMTP layer
stays free of the gateway's other concerns.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mdgateway"

#: Each room and its floor: a room may import from its own floor and below.
FLOORS = {
    "smtp": 0,
    "store": 0,
    "fileops": 0,
    "endpoints": 0,
    "tomlreader": 0,
    "message": 1,
    "policy": 2,
    "config": 3,
    "scan": 4,
    "relay": 4,
    "queue": 5,
    "receive": 6,
    "ops": 7,
    "run": 8,
    "testing": 9,
}
#: The emulator is a program of its own: it may use nothing of the gateway.
EMULATOR_MAY_IMPORT = {"emulator"}
#: The most lines a module may have.
MAX_LINES = 900


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts)
        yield name.removesuffix(".__init__"), path


def runtime_imports(path: Path) -> Iterator[tuple[int, str]]:
    """
    The C{mdgateway} modules a file imports at run time (imports guarded by
    C{if TYPE_CHECKING:} are for the type checker only).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                guarded.add(id(child))
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("mdgateway"):
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mdgateway"):
                    yield node.lineno, alias.name


def test_every_room_has_a_floor() -> None:
    """
    Every folder and top-level module of the package is placed in the
    order, so a new room cannot slip past the layering check.
    """
    rooms = {room(name) for name, _ in modules()} - {""}
    assert rooms - set(FLOORS) - {"emulator"} == set()


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v))
def test_no_upward_imports(name: str, path: Path) -> None:
    """
    A module imports only from its own room and rooms below it; the
    emulator imports nothing of the gateway.
    """
    here = room(name)
    bad = []
    for line, target in runtime_imports(path):
        there = room(target)
        if there in ("", here):
            continue
        if here == "emulator":
            allowed = there in EMULATOR_MAY_IMPORT
        elif there == "emulator":
            allowed = here in ("run", "testing")
        else:
            allowed = FLOORS.get(there, 99) <= FLOORS.get(here, -1)
        if not allowed:
            bad.append(f"{path.name}:{line} imports {target}")
    assert bad == []


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v))
def test_modules_stay_small(name: str, path: Path) -> None:
    """
    No module grows past the size where it holds more than one job.
    """
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
