"""The epoch and mode an agent last applied, kept on disk across restarts.

Epochs never go backwards on an agent: it refuses a directive older than the one it
applied. A restarted agent must remember that epoch too, or a replica that has not
read the latest pause yet could hand it an older ALLOWED. So the applied epoch is
written (temp file, fsync, rename: never half a file) before the ack is sent, read at
start, and sent in ``Hello.last_applied_epoch``. Without a state directory (the
simulator) it lives in memory only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.durable import StateFileError
from agent_stub.durable import read_state
from agent_stub.durable import write_durably

STATE_FILE = "applied-epoch.json"


class AppliedStateError(StateFileError):
    """The applied-epoch file exists but cannot be read."""


@dataclass(frozen=True, slots=True)
class Applied:
    epoch: int = 0
    mode: pb.Mode.ValueType = pb.MODE_UNSPECIFIED

    def describe(self) -> str:
        return f"epoch {self.epoch} ({pb.Mode.Name(self.mode).removeprefix('MODE_')})"


class AppliedStore:
    """``DIR/applied-epoch.json``: ``{"epoch": N, "mode": "MODE_PAUSED"}``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> Applied:
        """What was applied before; nothing (epoch 0) if never.

        A file that exists but is unreadable stops the agent rather than forgetting
        the epoch: forgetting it is exactly the rollback this file prevents.
        """
        applied = read_state(
            self.path,
            lambda raw: Applied(raw["epoch"], pb.Mode.Value(raw["mode"])),
            missing=Applied(),
            remedy="remove it only if this laptop should forget the last pause it obeyed",
            error=AppliedStateError,
        )
        if not isinstance(applied.epoch, int) or applied.epoch < 0:
            raise AppliedStateError(f"{self.path}: epoch {applied.epoch!r} is not a whole number")
        return applied

    def save(self, applied: Applied) -> None:
        """Replace the file atomically and durably."""
        text = json.dumps({"epoch": applied.epoch, "mode": pb.Mode.Name(applied.mode)})
        write_durably(self.path, text)
