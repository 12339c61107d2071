"""One capture agent: control stream, directives, leases, heartbeats, capture and upload."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub import limits
from agent_stub.applied import Applied
from agent_stub.applied import AppliedStore
from agent_stub.backoff import Backoff
from agent_stub.batches import UploadSequence
from agent_stub.capture import CaptureEngine
from agent_stub.channels import Reopen
from agent_stub.clock import NO_SLEEP_CLOCK
from agent_stub.clock import PLATFORM_CLOCK
from agent_stub.clock import PLATFORM_CLOCK_NAME
from agent_stub.clock import Clock
from agent_stub.clock import NoSleepClock
from agent_stub.config import DEFAULT_HEARTBEAT_SECONDS
from agent_stub.config import DEFAULT_LEASE_TTL_SECONDS
from agent_stub.config import AgentConfig
from agent_stub.durable import save_or_warn
from agent_stub.identity import Metadata
from agent_stub.lease import Lease
from agent_stub.local_state import NoticeBoard
from agent_stub.periodic import Cancellable
from agent_stub.periodic import Scheduled
from agent_stub.periodic import SharedRounds
from agent_stub.stream import ControlStream
from agent_stub.stream import Outbox
from agent_stub.upload import GatewayUploader
from agent_stub.wire import capture_report
from agent_stub.wire import channel_states
from agent_stub.wire import timestamp
from agent_stub.witness import Witness

log = structlog.get_logger("killswitch.agent")


def nack(epoch: int, reason: str) -> pb.AgentMessage:
    return pb.AgentMessage(nack=pb.Nack(epoch=epoch, reason=reason))


def _lease_clock(clock: Clock | NoSleepClock) -> tuple[Clock, str, str]:
    """The clock leases are timed by, its name for the server, and why the agent may
    never capture on it ("" when it may).

    Without a clock that counts sleep no lease is ever taken: the monotonic clock then
    only dates lease requests, and ALLOWED is refused with that reason."""
    if isinstance(clock, NoSleepClock):
        return time.monotonic, NO_SLEEP_CLOCK, f"cannot capture here: {clock}"
    return clock, PLATFORM_CLOCK_NAME if clock is PLATFORM_CLOCK else "given", ""


def _jittered(
    rng: random.Random,
    awake: asyncio.Event,
    period: float,
    action: Callable[[], None],
    shared: SharedRounds | None = None,
) -> Cancellable:
    """``action`` every ``period`` from a random start, so a fleet spreads the load: on
    a timer of its own, or in the slot of ``shared`` (of the same period) it falls in."""
    first_delay = rng.uniform(0, period)
    if shared is not None:
        return shared.schedule(action, first_delay=first_delay, awake=awake)
    return Scheduled(action, first_delay=first_delay, awake=awake, period=lambda: period)


class Agent:
    """Captures only under an unexpired lease, and answers every directive it acts on.

    ``call_metadata`` goes with every call: an insecure server reads the caller's
    identity from it (``identity.insecure_metadata``); over mTLS it stays empty.

    ``reopen`` opens a fresh channel of the agent's own. Given, the agent reopens its
    channel after every stream that ended: a replica that is up but cannot serve (it
    lost its database) keeps the TCP connection, which pick_first would reuse forever;
    a fresh channel (``ReplicaRotation``) starts at another replica and moves the agent on.

    ``clock`` counts sleep (``agent_stub.clock``); given ``NoSleepClock`` instead, the
    agent never holds a lease and refuses ALLOWED with that reason. ``applied_store``
    keeps the applied epoch across restarts (``agent_stub.applied``).

    ``ingest`` is a channel to the ingest gateway: given, the agent uploads real
    batches there, numbered by ``upload_sequence``; without, it uploads nothing.

    ``notices`` tells the person at the laptop of every change of its capture state
    and keeps the local state file (``agent_stub.local_state``).

    ``witness`` is told what the agent really does (``agent_stub.witness``). The fleet
    simulator's faulty agents (``simulator.faulty``) subclass this one: they swap in
    their own ``capture_engine``, clear ``awake`` to suspend the agent, and override
    ``_channels``, ``_report``, ``_may_upload``, ``_before_connecting``, ``_act_on``,
    ``_allow`` and ``_pause``, each of which does here what an honest agent does.

    ``capture_rounds``: given, the capture ticks run on that shared timer (a simulator's
    10,000 agents in one process), else on a timer of the agent's own.
    """

    # The simulator's faulty agents swap in an engine whose workers can misbehave.
    capture_engine: type[CaptureEngine] = CaptureEngine

    def __init__(
        self,
        config: AgentConfig,
        channel: grpc.aio.Channel,
        *,
        call_metadata: Metadata = (),
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        clock: Clock | NoSleepClock = PLATFORM_CLOCK,
        reopen: Reopen | None = None,
        applied_store: AppliedStore | None = None,
        ingest: grpc.aio.Channel | None = None,
        upload_sequence: UploadSequence | None = None,
        notices: NoticeBoard | None = None,
        witness: Witness | None = None,
        capture_rounds: SharedRounds | None = None,
    ) -> None:
        self.config = config
        self.notices = notices
        self._channel = channel
        self._reopen = reopen
        self._control = pb_grpc.AgentControlStub(channel)
        self._call_metadata = call_metadata
        # Every random choice of the agent's (jitter, first renewal), seeded in tests.
        self.rng = rng or random.Random()
        self._backoff = backoff or Backoff(rng=self.rng)
        # ``cannot_capture``: why this agent may never capture; empty if it may.
        lease_clock, self.lease_clock, self.cannot_capture = _lease_clock(clock)
        self.lease = Lease(lease_clock)
        self.witness = witness or Witness()
        self.engine = self.capture_engine(self.lease, self.witness)
        self.uploader = None
        if ingest is not None:
            self.uploader = GatewayUploader(
                config.agent_id,
                self.engine,
                ingest,
                call_metadata,
                witness=self.witness,
                sequence=upload_sequence,
                max_events=config.tuning.batch_events,
            )
        # Every loop of the agent waits on it: a simulator clears it to suspend one agent
        # of a fleet in one process, as a closed lid suspends a laptop.
        self.awake = asyncio.Event()
        self.awake.set()
        # The directive the agent last acted on (acked or nacked).
        self.directive: pb.Directive | None = None
        self._applied_store = applied_store
        self._capture_rounds = capture_rounds
        applied = applied_store.load() if applied_store is not None else Applied()
        self.applied_epoch, self.applied_mode = applied.epoch, applied.mode
        self.connected = False
        self._heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS
        # The lease TTL the server's newest directive set: renewals come at a third.
        self.lease_ttl = DEFAULT_LEASE_TTL_SECONDS
        self._stream: ControlStream | None = None
        self._heartbeats: Scheduled | None = None
        self._renewals: Scheduled | None = None
        self._uploading: asyncio.Task[None] | None = None
        # When (time.monotonic) this stream carried the agent's newest ack: heartbeats
        # say how long ago, so a stop the server was slow to record verifies in time.
        self._ack_sent_at: float | None = None

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    # ------------------------------------------------------------ reports

    def _allowed(self) -> bool:
        """May this agent capture (under a lease)? Only while ALLOWED, on a usable clock."""
        return (
            self.directive is not None
            and self.directive.mode == pb.MODE_ALLOWED
            and not self.cannot_capture
        )

    def newest_applied(self) -> Applied:
        """The newest epoch acted on (acked, nacked, or before a restart): no older one is."""
        if self.directive is not None and self.directive.epoch > self.applied_epoch:
            return Applied(self.directive.epoch, self.directive.mode)
        return Applied(self.applied_epoch, self.applied_mode)

    def _stale(self, directive: pb.Directive) -> bool:
        return directive.epoch < self.newest_applied().epoch

    def _channels(self) -> list[pb.Channel]:
        """The channels' states, as every report gives them: each as it is."""
        return channel_states(self.engine.active)

    def _report(self) -> pb.CaptureReport:
        """The capture counters every report carries: the engine's own."""
        return capture_report(self.engine)

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            agent_id=self.agent_id,
            labels=self.config.labels,
            agent_version=self.config.agent_version,
            lease_clock=self.lease_clock,
            sent_at=timestamp(time.time() + self.config.clock_skew),
            last_applied_epoch=self.applied_epoch,
            channels=self._channels(),
            report=self._report(),
        )

    # ------------------------------------------------------------ lifetime

    async def run(self) -> None:
        """Capture, upload and keep a control stream open, until cancelled."""
        tuning = self.config.tuning
        background = [
            _jittered(
                self.rng, self.awake, tuning.capture_tick, self._capture_round, self._capture_rounds
            ),
            _jittered(self.rng, self.awake, tuning.upload_every, self._upload_round),
        ]
        first_channel = self._channel
        try:
            await self._stay_connected()
        finally:
            for scheduled in background:
                scheduled.cancel()
            if self._uploading is not None:
                self._uploading.cancel()
                await asyncio.gather(self._uploading, return_exceptions=True)
            if self._channel is not first_channel:  # one of ours; the caller closes its own
                await self._channel.close(grace=None)

    def _capture_round(self) -> None:
        self.engine.tick()
        self._tell_capture_state()  # a lease that ran out between messages

    def _upload_round(self) -> None:
        """One batch at a time: a round due while the last upload still waits is skipped."""
        if self.uploader is not None and (self._uploading is None or self._uploading.done()):
            self._uploading = asyncio.get_running_loop().create_task(self.upload_once())

    async def upload_once(self) -> None:
        """One upload round: the oldest batch, only while allowed and under a lease."""
        if self.uploader is not None and self._may_upload():
            await self.uploader.upload()

    def _may_upload(self) -> bool:
        """Only while allowed and under a lease (so a batch refused for a pause not yet
        received is not retried once it is)."""
        return self._allowed() and self.lease.holds(self.lease.clock())

    async def _stay_connected(self) -> None:
        """Reconnect forever with jittered backoff."""
        while True:
            await self._before_connecting()
            try:
                reason = await self._session()
            except grpc.aio.AioRpcError as exc:
                # During a server restart INTERNAL and CANCELLED show up as well as
                # UNAVAILABLE: any status means "try again later".
                reason = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                # An agent that gives up is an agent nobody can pause: always retry.
                log.warning("agent_stream_error", agent_id=self.agent_id, error=repr(exc))
                reason = repr(exc)
            finally:
                self.connected = False
            delay = self._backoff.next_delay()
            log.info("agent_reconnecting", agent_id=self.agent_id, reason=reason, delay=delay)
            await asyncio.sleep(delay)
            await self._reopen_channel()

    async def _before_connecting(self) -> None:
        """Run before every attempt to connect: nothing keeps this agent from it."""

    async def _reopen_channel(self) -> None:
        if self._reopen is None:
            return
        old, self._channel = self._channel, self._reopen()
        self._control = pb_grpc.AgentControlStub(self._channel)
        await old.close(grace=None)

    async def _session(self) -> str:
        """One stream, until it ends; returns why it ended."""
        # aio streams are written to explicitly; the stubs only know the iterator form.
        call = self._control.Connect(metadata=self._call_metadata)  # type: ignore[call-arg]
        stream = ControlStream(call)
        self._stream = stream
        try:
            stream.send(pb.AgentMessage(hello=self._hello()))
            while (message := await stream.read()) is not None:
                await self.awake.wait()
                await self.handle(message, stream)
            return stream.ended_because or "server closed the stream"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the agent itself is being stopped
            # grpc aio also raises it when the call was cancelled on this side (the
            # agent dropped it, a write cut off halfway): a stream end, not a stop.
            if stream.dropped:
                return "dropped the stream (went offline)"
            return stream.ended_because or "the stream was cancelled on the agent's side"
        finally:
            self._stream = self._heartbeats = self._renewals = None
            self._ack_sent_at = None  # an ack counts on the stream that carried it
            await stream.close()

    # ------------------------------------------------------------ server messages

    async def handle(self, message: pb.ServerMessage, stream: Outbox) -> None:
        """React to one message from the server, answering on ``stream``."""
        kind = message.WhichOneof("body")
        if kind == "directive":
            self.connected = True
            self._backoff.reset()
            await self._on_directive(message.directive, stream)
        elif kind == "lease_grant":
            self._on_lease_answer(message.lease_grant)

    async def _on_directive(self, directive: pb.Directive, stream: Outbox) -> None:
        if not self._stale(directive):  # a stale directive's pacing is as stale as it
            self._heartbeat_interval = limits.heartbeat_interval(
                directive.heartbeat_interval_seconds, self._heartbeat_interval
            )
            self.lease_ttl = limits.directive_ttl(directive.lease_ttl_seconds, self.lease_ttl)
        if self._heartbeats is None:  # from a random point, to spread a fleet's heartbeats
            self._heartbeats = stream.schedule(
                Scheduled(
                    functools.partial(self.send_heartbeat, stream),
                    first_delay=self.rng.uniform(0, self._heartbeat_interval),
                    awake=self.awake,
                    period=lambda: self._heartbeat_interval,
                )
            )
        await self._act_on(directive, stream)

    async def _act_on(self, directive: pb.Directive, stream: Outbox) -> None:
        """Every directive received is applied at once, and answered."""
        await self._apply_and_reply(directive, stream)

    async def _apply_and_reply(self, directive: pb.Directive, stream: Outbox) -> None:
        reply = self.apply(directive)
        self._keep_renewing(stream)
        self._tell_capture_state()
        stream.send(reply)
        if reply.HasField("ack"):
            self._ack_sent_at = time.monotonic()
            if reply.ack.mode == pb.MODE_PAUSED:
                report = functools.partial(_report_pause, self, stream, reply.ack.epoch)
                delay = self.config.tuning.proof_report_delay
                stream.schedule(Scheduled(report, first_delay=delay, awake=self.awake))

    def apply(self, directive: pb.Directive) -> pb.AgentMessage:
        """Act on a directive; returns the ack or nack to send.

        A directive older than the newest applied (a replica that has not caught up)
        changes nothing: a pause is never undone by an older ALLOWED. Same-epoch
        re-sends are applied again, harmlessly.
        """
        if self._stale(directive):
            reason = (
                f"refused directive at epoch {directive.epoch}: older than applied"
                f" {self.newest_applied().describe()}"
            )
            log.warning("stale_directive_refused", agent_id=self.agent_id, reason=reason)
            return nack(directive.epoch, reason)
        self.directive = directive
        if directive.mode == pb.MODE_ALLOWED:
            return self._allow(directive)
        # Anything else means off, and a pause ends the lease at once.
        now = self.lease.clock()
        self.lease.revoke()
        self.witness.lease_revoked(now)
        return self._pause(directive)

    def _allow(self, directive: pb.Directive) -> pb.AgentMessage:
        """Acked (capture starts once a lease is granted), unless this agent cannot capture."""
        if self.cannot_capture:
            return nack(directive.epoch, self.cannot_capture)
        return self._ack(directive)

    def _pause(self, directive: pb.Directive) -> pb.AgentMessage:
        """Every channel stops and the spool leaves the upload path; acked only if so."""
        refused = self.engine.stop_all()
        if directive.mode != pb.MODE_PAUSED:
            return nack(directive.epoch, f"unknown mode {directive.mode}")
        discarded = self.engine.discard_spool(purge=directive.purge_spool)
        if refused:
            return nack(directive.epoch, f"channel(s) {','.join(refused)} did not stop")
        return self._ack_pause(directive, discarded)

    def _ack_pause(self, directive: pb.Directive, events: int) -> pb.AgentMessage:
        """The ack of a pause that purged or quarantined ``events``, as it asked."""
        if directive.purge_spool:
            return self._ack(directive, purged=events)
        return self._ack(directive, quarantined=events)

    def _ack(
        self, directive: pb.Directive, *, purged: int = 0, quarantined: int = 0
    ) -> pb.AgentMessage:
        self.applied_epoch, self.applied_mode = directive.epoch, directive.mode
        self.witness.directive_applied(time.time(), directive.epoch, pb.Mode.Name(directive.mode))
        self._remember(Applied(directive.epoch, directive.mode))
        ack = pb.Ack(
            epoch=directive.epoch,
            mode=directive.mode,
            channels=self._channels(),
            report=self._report(),
            purged_events=purged,
            quarantined_events=quarantined,
        )
        return pb.AgentMessage(ack=ack)

    def _remember(self, applied: Applied) -> None:
        """On disk before the ack leaves; a failed write still acks what was done."""
        save_or_warn(
            self._applied_store,
            applied,
            log.warning,
            "applied_epoch_not_saved",
            agent_id=self.agent_id,
            epoch=applied.epoch,
        )

    # ------------------------------------------------------------ leases

    def _keep_renewing(self, stream: Outbox) -> None:
        """Request a lease now and every third of its TTL while allowed; stop otherwise."""
        if self._allowed() and self._renewals is None:
            self._renewals = _renewals(self, stream)
        elif not self._allowed() and self._renewals is not None:
            self._renewals.cancel()
            self._renewals = None

    def request_lease(self, stream: Outbox) -> None:
        request_id, sent_at = self.lease.request()
        self.witness.lease_requested(request_id, sent_at)
        stream.send(pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=request_id)))

    def _on_lease_answer(self, grant: pb.LeaseGrant) -> None:
        ttl = limits.granted_ttl(grant.ttl_seconds) if grant.granted else None
        # The witness counts the lease a correct agent may hold: the clamped one.
        self.witness.lease_answered(grant.request_id, ttl is not None, ttl or 0.0)
        # Only an ALLOWED agent holds a lease; a grant for a paused one counts as a refusal.
        granted = ttl is not None and self._allowed()
        if not self.lease.answer(grant.request_id, granted, ttl or 0.0):
            return
        if self._allowed() and self.lease.holds(self.lease.clock()):
            self.engine.start_all()
        else:
            self.engine.enforce_lease()
        self.engine.watch_lease()
        self._tell_capture_state()

    def _tell_capture_state(self) -> None:
        if self.notices is not None:
            self.notices.observe(self.directive, self.lease)

    def send_heartbeat(self, stream: Outbox) -> None:
        acked = self._ack_sent_at
        beat = pb.Heartbeat(
            applied_epoch=self.applied_epoch,
            channels=self._channels(),
            report=self._report(),
            seconds_since_ack=0.0 if acked is None else time.monotonic() - acked,
        )
        stream.send(pb.AgentMessage(heartbeat=beat))


def _renewals(agent: Agent, stream: Outbox) -> Scheduled:
    """The first lease at once, then renewals from a random point of the first
    interval: timed from the connect, a fleet that connected together (a server
    restart) would renew in lockstep forever. Earlier than the interval is safe."""
    first = True

    def interval() -> float:
        nonlocal first
        every = limits.renewal_interval(agent.lease_ttl)
        if first:
            first = False
            return agent.rng.uniform(0, every)
        return every

    request = functools.partial(agent.request_lease, stream)
    return stream.schedule(Scheduled(request, first_delay=0.0, awake=agent.awake, period=interval))


def _report_pause(agent: Agent, stream: Outbox, epoch: int) -> None:
    """The capture report a few ticks after acking pause ``epoch``: frozen counters across
    them verify the stop now, not a heartbeat later (which checks them again)."""
    if (agent.applied_epoch, agent.applied_mode) == (epoch, pb.MODE_PAUSED):
        agent.send_heartbeat(stream)
