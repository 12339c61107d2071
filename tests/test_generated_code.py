"""Generated protobuf code is committed; this fails when it no longer matches protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)

    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {
        p.relative_to(ROOT / "protos"): p.read_bytes()
        for p in (ROOT / "protos").rglob("*")
        if p.suffix in {".py", ".pyi"} and p.parent != ROOT / "protos"
    }
    assert fresh.keys() == committed.keys(), "generated file set changed: run protos/generate.py"
    stale = sorted(str(path) for path, data in fresh.items() if committed[path] != data)
    assert not stale, f"stale generated code {stale}: run `python protos/generate.py`"
