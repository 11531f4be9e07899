"""Every module of the package opens with a docstring saying what it owns (issue 11), read
from the source with ``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "statefun_mesh"


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(f.relative_to(PKG.parent))
        for f in sorted(PKG.rglob("*.py"))
        if not (ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or "").strip()
    ]
    assert not missing, f"modules without an opening docstring (say what the module owns): {missing}"
