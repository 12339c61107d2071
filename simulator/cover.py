"""What a modified agent claims about a pause it does not obey (simulated faults only)."""

from __future__ import annotations

from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.capture import CaptureEngine
from agent_stub.wire import capture_report
from simulator.faults import FROZEN_REPORTS
from simulator.faults import Fault


class CoverStory:
    """The counters an agent reports, and what it says its pause did with the spool.

    An honest agent, and the ``lie`` fault, report the engine's real counters: the liar
    confesses. The hiding faults (``FROZEN_REPORTS``) claim what the honest agent's
    pause would have done (the spool purged or quarantined) and report the counters of
    that moment from then on, until an ALLOWED lets them report capture again.
    """

    def __init__(self, engine: CaptureEngine, fault: Fault) -> None:
        self._engine = engine
        self._hides = fault in FROZEN_REPORTS
        self._frozen: pb.CaptureReport | None = None

    def report(self) -> pb.CaptureReport:
        return self._frozen if self._frozen is not None else capture_report(self._engine)

    def pretend_pause(self) -> int:
        """The events it claims the pause purged or quarantined: none for the liar,
        the spool for a hiding agent (once: its spool is "empty" from then)."""
        if not self._hides or self._frozen is not None:
            return 0
        claimed = self._engine.spool_events
        self.freeze()
        return claimed

    def freeze(self) -> None:
        """From now on report this moment's counters, with an empty spool."""
        if self._hides and self._frozen is None:
            self._frozen = capture_report(self._engine)
            self._frozen.spool_events = 0

    def thaw(self) -> None:
        self._frozen = None
