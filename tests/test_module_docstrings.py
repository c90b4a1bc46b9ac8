"""Module docstrings stay short: what the module is and why, with the rest in docs/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("kernels", "modeling", "data", "launcher")
MAX_LINES = 20  # the house rule is "about 15 lines"; this catches the essays


@pytest.mark.unit
def test_no_module_docstring_is_longer_than_twenty_lines():
    long = []
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
            if doc and len(doc.splitlines()) > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}: {len(doc.splitlines())} lines")
    assert not long, f"module docstrings over {MAX_LINES} lines (move the detail to docs/): {long}"
