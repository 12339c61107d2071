"""What the laptop itself knows of its capture state, for ``killswitch-agent status`` and
for the notices: mode, epoch, lease expiry and the last reason, ticket and decider.

Written to ``DIR/capture-state.json`` on every change (temp file, fsync, rename) and
read back at start, so a restarted agent that was paused still tells its owner when
capture resumes. A notice is shown on every change of the capture state; a fresh
agent's first ALLOWED is no change to announce.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path

import structlog
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.durable import read_state
from agent_stub.durable import save_or_warn
from agent_stub.durable import write_durably
from agent_stub.lease import Lease
from agent_stub.notices import CaptureState
from agent_stub.notices import Notice
from agent_stub.notices import Notifier
from agent_stub.notices import show_safely

log = structlog.get_logger("killswitch.agent.local_state")

STATE_FILE = "capture-state.json"
LEASE_LOST_REASON = (
    "the capture lease ran out before the control server renewed it; capture stays off"
    " until it does"
)
FAIL_CLOSED = "this laptop (fail closed)"


@dataclass(frozen=True, slots=True)
class LocalState:
    """The last capture state this laptop announced, as it is kept on disk: what
    ``status`` answers from, and what a restarted agent compares new directives with."""

    agent_id: str
    state: CaptureState
    mode: str
    epoch: int
    reason: str
    ticket: str
    decided_by: str
    # Wall-clock time the capture lease runs out; None while none is held.
    lease_expires_at: float | None
    updated_at: float

    def describe(self) -> str:
        """What ``killswitch-agent status`` prints."""
        lease = "none held"
        if self.lease_expires_at is not None:
            left = self.lease_expires_at - time.time()
            when = _utc(self.lease_expires_at)
            lease = f"expires {when} (in {left:.0f} s)" if left > 0 else f"expired {when}"
        return "\n".join(
            [
                f"agent:        {self.agent_id}",
                f"capture:      {self.state}",
                f"mode:         {self.mode}",
                f"epoch:        {self.epoch}",
                f"lease:        {lease}",
                f"last reason:  {self.reason}",
                f"ticket:       {self.ticket or '-'}",
                f"decided by:   {self.decided_by or '-'}",
                f"updated:      {_utc(self.updated_at)}",
            ]
        )


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def capture_state(directive: pb.Directive | None, lease: Lease) -> CaptureState | None:
    """What the laptop's owner is told; None while it is not settled (no directive yet,
    or allowed with no lease granted yet)."""
    if directive is None:
        return None
    if directive.mode != pb.MODE_ALLOWED:
        return CaptureState.OPTED_OUT if directive.opt_out else CaptureState.PAUSED
    if lease.holds(lease.clock()):
        return CaptureState.RESUMED
    if lease.expires_at is not None:
        return CaptureState.LEASE_LOST
    return None


class LocalStateFile:
    """``DIR/capture-state.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> LocalState | None:
        return read_state(
            self.path,
            lambda raw: LocalState(**{**raw, "state": CaptureState(raw["state"])}),
            missing=None,
        )

    def save(self, state: LocalState) -> None:
        write_durably(self.path, json.dumps(asdict(state)))


class NoticeBoard:
    """Shows a notice on every change of the capture state and keeps the local state.

    Neither a failing notifier nor an unwritable state file reaches the caller: both
    are logged, and capture-state handling goes on as before.
    """

    def __init__(
        self, agent_id: str, notifier: Notifier | None, state_file: LocalStateFile | None
    ) -> None:
        self._agent_id = agent_id
        self._notifier = notifier
        self._file = state_file
        self.current = state_file.load() if state_file is not None else None
        # The lease expiry last converted to wall-clock time: (boottime expiry, wall).
        self._lease_wall: tuple[float | None, float | None] = (None, None)

    def observe(self, directive: pb.Directive | None, lease: Lease) -> None:
        """Called after every directive, lease answer and capture round: cheap when
        nothing changed, which is almost always."""
        state = capture_state(directive, lease)
        if state is None or directive is None:
            return
        expires = self._lease_expires_wall(lease)
        current = self.current
        if (
            current is not None
            and current.state is state
            and current.epoch == directive.epoch
            and current.lease_expires_at == expires
        ):
            return
        lost = state is CaptureState.LEASE_LOST
        self.update(
            LocalState(
                agent_id=self._agent_id,
                state=state,
                mode=pb.Mode.Name(directive.mode).removeprefix("MODE_"),
                epoch=directive.epoch,
                reason=LEASE_LOST_REASON if lost else directive.reason,
                ticket="" if lost else directive.ticket,
                decided_by=FAIL_CLOSED if lost else directive.decided_by,
                lease_expires_at=expires,
                updated_at=time.time(),
            )
        )

    def _lease_expires_wall(self, lease: Lease) -> float | None:
        """The lease expiry in wall-clock time, converted once per grant."""
        expires = lease.expires_at
        if self._lease_wall[0] != expires:
            wall = None if expires is None else time.time() + (expires - lease.clock())
            self._lease_wall = (expires, wall)
        return self._lease_wall[1]

    def update(self, seen: LocalState) -> None:
        """The agent's state now; notices and saves only what changed."""
        previous = self.current
        if previous is not None and replace(previous, updated_at=seen.updated_at) == seen:
            return
        self.current = seen
        save_or_warn(self._file, seen, log.warning, "capture_state_not_saved")
        if previous is None:
            changed = seen.state is not CaptureState.RESUMED
        else:
            changed = previous.state is not seen.state
        if changed and self._notifier is not None:
            notice = Notice(
                self._agent_id,
                seen.state,
                seen.reason,
                seen.ticket,
                seen.decided_by,
                seen.epoch,
                seen.updated_at,
            )
            show_safely(self._notifier, notice)
