"""No module over 600 lines and no class over 400, generated code aside.

A file or class a newcomer cannot hold in mind is where changes go wrong: the limits of
issue 18, kept by a test rather than by a reviewer's memory. The tree is read as git
tracks it, so a scratch file in a checkout counts for nothing.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 400


def tracked_python_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    generated = ("_pb2.py", "_pb2_grpc.py")
    return [ROOT / name for name in listed if not name.endswith(generated)]


def test_no_module_is_too_long_to_read_whole() -> None:
    files = tracked_python_files()
    assert len(files) > 100, "git ls-files found almost nothing: is ROOT a checkout?"
    long = {
        str(path.relative_to(ROOT)): lines
        for path in files
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"over {MAX_FILE_LINES} lines: {long}"


def test_no_class_is_too_long_to_read_whole() -> None:
    long = {}
    for path in tracked_python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"
