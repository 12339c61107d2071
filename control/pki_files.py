"""Files of the PKI: owner-only, written whole or not at all, read with one-line errors."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control.errors import KillswitchError


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents owner-only; existing directories are left alone."""
    missing = list(itertools.takewhile(lambda p: not p.is_dir(), (path, *path.parents)))
    try:
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o700)
    except OSError as exc:
        raise KillswitchError(f"cannot create directory {exc.filename}: {exc.strerror}") from None


def write_private(path: Path, data: bytes) -> None:
    """Owner-only whatever the umask, and whole or not at all (written beside, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise KillswitchError(f"cannot write {path}: {exc.strerror}") from None


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_file(path))
    except ValueError as exc:
        raise KillswitchError(f"unreadable certificate {path}: {exc}") from None


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(read_file(path), password=None)
    except ValueError as exc:
        raise KillswitchError(f"unreadable key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KillswitchError(f"unreadable key {path}: not an EC key")
    return key


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KillswitchError(f"missing {path}") from None
    except OSError as exc:
        raise KillswitchError(f"cannot read {path}: {exc.strerror}") from None
