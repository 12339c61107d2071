"""Regenerate the Python code for every ``.proto`` under ``protos/``.

Generated files live next to their sources (``protos/killswitch/v1/``) and are
committed, so running the product never needs ``grpcio-tools``. They are never
edited by hand: ``tests/test_generated_code.py`` fails when they are stale.

Usage: ``python protos/generate.py [OUT_DIR]`` (default: ``protos/``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_MARKER = '"""Generated from protos/; do not edit. Run protos/generate.py."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc with the Python, gRPC and mypy plugins; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if mypy_plugin is None or mypy_grpc_plugin is None:
        raise SystemExit("protoc-gen-mypy not found next to this Python: install the dev extras")
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # In a process of its own: protoc starts its plugins with fork(), which is unsafe in a
    # process where gRPC threads run (a test worker that served or called gRPC before:
    # the forked mypy plugin died of SIGSEGV in one CI run).
    done = subprocess.run(
        [sys.executable, "-m", *args], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"protoc failed: {done.stderr.strip()}")
    for source in sources:
        package_dir = out_dir / Path(source).parent
        for directory in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = out_dir / directory / "__init__.py"
            if directory != Path(".") and not init.exists():
                init.write_text(PACKAGE_MARKER)
    return sorted(
        p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"} and p.parent != out_dir
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for path in generate(target):
        print(path)
