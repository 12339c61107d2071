"""Real file systems under a store, for its faults: a small tmpfs that a test fills (a
full disk), and an ext4 image that the kernel turns read-only under open files (a
failing disk). Mounting needs root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")


def mount_tmpfs(at: Path) -> Path:
    """A 16 MiB tmpfs at ``at`` (a new directory)."""
    at.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(at)], check=True)
    return at


def mount_ext4(at: Path) -> Path:
    """A 32 MiB ext4 image (beside ``at``) mounted at ``at`` with errors=remount-ro."""
    image = at.parent / f"{at.name}.ext4"
    at.mkdir()
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(at)], check=True)
    return at


def mounted(mount: Callable[[Path], Path], at: Path) -> Iterator[Path]:
    """For a fixture: ``mount`` at ``at`` (skipped without root), unmounted afterwards."""
    need_root()
    disk = mount(at)
    try:
        yield disk
    finally:
        unmount(disk)


def unmount(at: Path) -> None:
    """Lazily: a server still stopping, or a store still closing, lets go later."""
    subprocess.run(["umount", "-l", str(at)], check=False)


def fill(disk: Path) -> None:
    """Write zeroes until the disk is full (into ``disk / "fill"``)."""
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={disk / 'fill'}", "bs=64k"], capture_output=True, check=False
    )


def turn_read_only(disk: Path) -> None:
    """What ext4 does on a disk error with errors=remount-ro: `mount -o remount,ro`
    refuses while the database is open for writing, the kernel does not."""
    device = Path(
        subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(disk)], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    (Path("/sys/fs/ext4") / device.name / "trigger_fs_error").write_text("drill\n")
