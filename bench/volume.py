"""A file system of its own for a benchmark's sink: an ext4 image on a loop device.

The gateway's group commit is one ``syncfs(2)``, which writes back everything dirty on
the sink's file system, and ``deploy/README.md`` asks for a volume of its own. On the
box's root file system the benchmark's commits also wrote back the control server's
SQLite, the simulators' files and whatever else ran beside it: at 23:09 UTC on
2026-12-04, with a test run beside the bench, a group commit's p99 was 250 ms.
The baseline's bare sink gets a volume of the same kind, so both sides stand alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

SHARED = "the shared root file system"


@contextlib.contextmanager
def own_volume(mount_point: Path, size_gib: int = 8) -> Iterator[str]:
    """A fresh ext4 file system mounted at ``mount_point`` while the block runs.

    Yields what the sink sits on, for the report. Where that cannot be done (not root,
    no ``mkfs.ext4``), the sink stays on the shared root file system and the answer
    says so: the figures are still measured, on a noisier disk.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    why_not = _why_no_volume()
    if why_not:
        yield f"{SHARED} ({why_not})"
        return
    image = mount_point.with_name(f"{mount_point.name}.img")
    with image.open("wb") as sparse:
        sparse.truncate(size_gib * 1024**3)
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop", str(image), str(mount_point))
    try:
        yield f"an ext4 volume of its own ({size_gib} GiB, loop device)"
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode:
            _run("umount", "--lazy", str(mount_point))


def _why_no_volume() -> str:
    if os.geteuid() != 0:
        return "a volume of its own needs root"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found" if missing else ""


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
