"""Small state files an agent must not lose or half-write (temp file, fsync, rename),
nor forget in silence when they cannot be read."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Protocol
from typing import TypeVar

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class StateStore(Protocol[T_contra]):
    """A state file's owner: where it lives, and how a value is written to it."""

    @property
    def path(self) -> Path: ...

    def save(self, value: T_contra, /) -> None: ...


class StateFileError(Exception):
    """A state file exists but cannot be read; one line naming it and what to do."""


def read_state(
    path: Path,
    parse: Callable[[Any], T],
    *,
    missing: T,
    remedy: str = "",
    error: type[StateFileError] = StateFileError,
) -> T:
    """``parse`` of the JSON in ``path``; ``missing`` when there is no file.

    A file that exists but cannot be read or parsed raises ``error`` naming it (and
    ``remedy``, what the owner may do): an agent that forgot its state could undo what it
    guards (an applied pause, a batch number), so it stops instead.
    """
    try:
        return parse(json.loads(path.read_text()))
    except FileNotFoundError:
        return missing
    except (OSError, ValueError, KeyError, TypeError) as exc:
        advice = f": {remedy}" if remedy else ""
        raise error(f"cannot read {path} ({exc!r}){advice}") from None


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically and durably: readers see the old text or the new."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    # The rename itself is durable only once the directory is synced (POSIX).
    if hasattr(os, "O_DIRECTORY"):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_or_warn(
    store: StateStore[T] | None,
    value: T,
    warn: Callable[..., object],
    event: str,
    **context: object,
) -> None:
    """Save ``value`` to ``store`` (if the agent keeps state at all), for state whose write
    may fail without harm to what the agent just did: a full or read-only disk is logged as
    ``event`` through ``warn`` (the caller's logger, so the line names its module) and the
    agent goes on, never half a file behind (``write_durably``)."""
    if store is None:
        return
    try:
        store.save(value)
    except OSError as exc:
        warn(event, **context, path=str(store.path), error=str(exc))
