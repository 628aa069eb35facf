"""The rooms of docs/ARCHITECTURE.md import only the rooms its table allows (type-checking imports aside)."""

from __future__ import annotations

import ast

from helpers import ROOT

ERRORS = {"errors"}
ALLOWED = {  # room -> the rooms it may import (besides itself), as docs/ARCHITECTURE.md's table says
    "errors": set(),
    "timing": ERRORS,
    "config": ERRORS,
    "io": ERRORS,
    "segment": ERRORS | {"io", "timing", "config"},
    "structures": ERRORS | {"io", "config"},
    "stats": ERRORS | {"structures", "config"},
    "workflow": ERRORS | {"config", "segment", "structures", "stats"},
    "outputs": ERRORS | {"io", "structures", "stats", "workflow", "timing"},
    "run": ERRORS | {"io", "segment", "structures", "stats", "outputs", "workflow", "timing"},
    "train": ERRORS | {"io", "segment", "run", "timing"},
    "cli": ERRORS | {"io", "segment", "structures", "stats", "outputs", "run", "train", "workflow", "config"},
}


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Rooms named by ``from histo.<room> …`` / ``import histo.<room>`` outside ``if TYPE_CHECKING:``."""
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    rooms = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histo."):
            rooms.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            rooms |= {a.name.split(".")[1] for a in node.names if a.name.startswith("histo.")}
    return rooms


def test_rooms_import_only_the_rooms_below_them():
    files = sorted((ROOT / "histo").rglob("*.py"))
    assert len(files) > 40
    wrong = []
    for f in files:
        rel = f.relative_to(ROOT / "histo")
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if room == "__init__":
            continue
        assert room in ALLOWED, f"{rel}: a room docs/ARCHITECTURE.md does not list"
        extra = _runtime_imports(ast.parse(f.read_text())) - ALLOWED[room] - {room}
        wrong += [f"{rel} imports histo.{r}" for r in sorted(extra)]
    assert not wrong, wrong
