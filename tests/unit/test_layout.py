"""The platform's rooms and the direction of their dependencies, read from the source.

``orchestration/`` is one sub-package per job; a room may import only the rooms before it:

    common <- definition <- tracking <- results <- running <- cluster

(the cluster submits sweeps as commands, so it needs no room after ``results``). The
top-level modules are the command lines users type, ``python -m orchestration.<command>``,
and nothing else.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "orchestration"
ROOMS = ["common", "definition", "tracking", "results", "running", "cluster"]
COMMANDS = ["sweep", "jobs", "compare", "registry", "prior_shift"]


def imported_rooms(path: Path) -> dict[str, int]:
    """Each orchestration room ``path`` imports (anywhere in the file), with a line number."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orchestration."):
            found.setdefault(node.module.split(".")[1], node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("orchestration."):
                    found.setdefault(alias.name.split(".")[1], node.lineno)
    return found


def test_every_module_lives_in_a_room_or_is_a_command():
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top_level == sorted(["__init__", "__main__", *COMMANDS])
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert rooms == sorted(ROOMS)
    for command in COMMANDS:
        # An entry point: the docstring, then at most a handful of statements (the token
        # step before Ray is imported, the import of the room's main, the call).
        statements = ast.parse((PACKAGE / f"{command}.py").read_text()).body[1:]
        assert len(statements) <= 5, f"{command}.py is more than an entry point"
        assert not any(isinstance(s, (ast.FunctionDef, ast.ClassDef)) for s in statements)


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_imports_only_the_rooms_before_it(room):
    allowed = set(ROOMS[: ROOMS.index(room) + 1])
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line} imports orchestration.{target}"
        for path in sorted((PACKAGE / room).rglob("*.py"))
        for target, line in imported_rooms(path).items()
        if target not in allowed
    ]
    assert wrong == []


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_line_still_answers_to_its_name(command):
    shown = subprocess.run(
        [sys.executable, "-m", f"orchestration.{command}", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"python -m orchestration.{command}" in shown.stdout
