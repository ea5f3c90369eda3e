"""The layout is the architecture: ``io/`` holds front ends only, and nothing below a front end imports one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "assistant"
FRONT_ENDS = {"cli.py", "voice_cli.py", "__main__.py"}  # the command line builds front ends; nothing else may


def test_nothing_below_the_front_ends_imports_io():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "io" or relative.name in FRONT_ENDS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{relative}: {name}" for name in names if name.startswith("assistant.io")]
    assert offenders == [], offenders
