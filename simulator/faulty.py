"""A simulated agent: the reference agent, counted by its ground truth, that misbehaves
as its ``Fault`` says once the fault is triggered (honest until then, and for ever if
its fault is NONE).

It changes the reference agent only through the seams ``agent_stub.agent.Agent``
offers (overridden methods, ``capture_engine``, ``awake``, ``witness``), so what it
does apart from its fault is exactly what a real agent does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.agent import Agent
from agent_stub.capture import CHANNELS
from agent_stub.capture import CaptureEngine
from agent_stub.stream import Outbox
from agent_stub.wire import channel_states
from simulator.cover import CoverStory
from simulator.faults import CAPTURE_REGARDLESS
from simulator.faults import RELABEL_TO
from simulator.faults import Fault
from simulator.faults import SimulatedConfig
from simulator.truth import GroundTruth

ALL_STOPPED = dict.fromkeys(CHANNELS, False)


class FaultyCaptureEngine(CaptureEngine):
    """Capture workers that can be told to break the rules (honest until they are)."""

    # Workers that refuse to stop (the stubborn fault).
    stuck_channels: frozenset[str] = frozenset()
    # A modified agent that captures whatever its lease says (the lying faults).
    ignore_lease = False

    def _stop(self, name: str) -> None:
        if name not in self.stuck_channels:
            super()._stop(name)

    def _may_capture(self, now: float) -> bool:
        return self.ignore_lease or super()._may_capture(now)


class SimulatedAgent(Agent):
    """``trigger_fault`` turns it into its configured ``Fault``; ``truth`` is what it
    really did. ``options`` are the reference agent's (``Agent``)."""

    capture_engine = FaultyCaptureEngine
    config: SimulatedConfig
    engine: FaultyCaptureEngine

    def __init__(self, config: SimulatedConfig, channel: grpc.aio.Channel, **options: Any) -> None:
        self.truth = GroundTruth(capture_tick=config.tuning.capture_tick)
        super().__init__(config, channel, witness=self.truth, **options)
        self.cover = CoverStory(self.engine, config.fault)
        self.fault_active = False
        self._offline_until = 0.0
        # Slow directives are numbered as received so a late one never undoes a newer one.
        self._received = 0
        self._latest_applied = 0

    def _faulty(self, fault: Fault) -> bool:
        return self.fault_active and self.config.fault is fault

    def _lying(self) -> bool:
        """A modified agent that captures regardless of its lease and of a pause it acked."""
        return self.fault_active and self.config.fault in CAPTURE_REGARDLESS

    # ------------------------------------------------------------ the trigger

    def trigger_fault(self) -> None:
        """From now on, misbehave as configured (honest agents carry on unchanged)."""
        fault = self.config.fault
        if fault is Fault.NONE or self.fault_active:
            return
        self.fault_active = True
        tuning = self.config.fault_tuning
        if fault is Fault.STUBBORN:
            self.engine.stuck_channels = frozenset({"screen"})
        elif fault in CAPTURE_REGARDLESS:
            # Captures whatever it was told, and a paused liar secretly starts again.
            if not self._allowed():
                self.cover.freeze()  # a hiding agent keeps reporting its honest pause
            self.engine.ignore_lease = True
            self.engine.start_all()
        elif fault is Fault.OFFLINE:
            self._go_offline(tuning.offline_seconds(self.lease_ttl))
        elif fault is Fault.SLEEP:
            self._suspend(tuning.sleep_seconds(self.lease_ttl))
        elif fault is Fault.RELABEL:
            self.config.labels = {**self.config.labels, **RELABEL_TO}
            self._go_offline(0.0)  # the next Hello carries the new labels

    def _go_offline(self, seconds: float) -> None:
        self._offline_until = asyncio.get_running_loop().time() + seconds
        if self._stream is not None:
            self._stream.drop()

    def _offline_remaining(self) -> float:
        if not self._offline_until:
            return 0.0
        return max(0.0, self._offline_until - asyncio.get_running_loop().time())

    def _suspend(self, seconds: float) -> None:
        """Nothing of this agent runs for ``seconds``; its boottime clock keeps counting."""
        self.awake.clear()
        asyncio.get_running_loop().call_later(seconds, self.awake.set)

    # ------------------------------------------------------------ the seams

    async def _before_connecting(self) -> None:
        """An offline agent waits it out."""
        await asyncio.sleep(self._offline_remaining())

    def _may_upload(self) -> bool:
        """Never while offline; an exfiltrator never, the other liars always."""
        if self._offline_remaining() or self._faulty(Fault.EXFILTRATOR):
            return False
        return self._lying() or super()._may_upload()

    def _channels(self) -> list[pb.Channel]:
        """A paused liar says every channel is stopped."""
        if self._lying() and not self._allowed():
            return channel_states(ALL_STOPPED)
        return super()._channels()

    def _report(self) -> pb.CaptureReport:
        return self.cover.report()

    async def _act_on(self, directive: pb.Directive, stream: Outbox) -> None:
        """Ignored, applied after a random delay (slow), or at once."""
        if self._faulty(Fault.IGNORE):
            return
        if not self._faulty(Fault.SLOW):
            await super()._act_on(directive, stream)
            return
        self._received += 1
        delay = self.rng.uniform(0, self.config.fault_tuning.slow_max)
        stream.spawn(self._apply_late(directive, stream, self._received, delay))

    async def _apply_late(
        self, directive: pb.Directive, stream: Outbox, number: int, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        if number < self._latest_applied:
            return  # a newer directive was applied meanwhile
        self._latest_applied = number
        await self._apply_and_reply(directive, stream)

    def _allow(self, directive: pb.Directive) -> pb.AgentMessage:
        self.cover.thaw()  # a resumed agent may report capture again
        return super()._allow(directive)

    def _pause(self, directive: pb.Directive) -> pb.AgentMessage:
        """A liar acks "stopped", with whatever its cover story says of the spool."""
        if self._lying():
            return self._ack_pause(directive, self.cover.pretend_pause())
        return super()._pause(directive)
