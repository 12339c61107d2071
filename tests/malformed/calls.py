"""Calls to the one real server, and what every answer must be (``check``).

Who calls (the fixture's people and agents), the gRPC paths, one function per call
shape (``unary``, ``server_stream``, ``bidi``, or ``call`` for any), and a raw
agent stream (``StreamingAgent``) that speaks exactly what a test puts in it.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from killswitch.v1 import killswitch_pb2 as pb

from control.pki import load_identity
from tests.conftest import ServerProcess

OPERATOR = "/killswitch.v1.Operator/"
SELF_SERVICE = "/killswitch.v1.SelfService/"
CONNECT = "/killswitch.v1.AgentControl/Connect"
AUTHORIZE_UPLOAD = "/killswitch.v1.Ingest/AuthorizeUpload"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

IC, APPROVER, EMPLOYEE = "ic-1", "approver-1", "employee-1"
INGEST = "ingest-1"  # the ingest gateway's identity: it asks about agents' uploads
GOOD = "fz-good"  # the well-behaved agent
FUZZ_AGENT = "fz-agent"  # the agent certificate the fuzzing speaks with
CROWD = "fz-crowd"  # opens too many calls at once
KA_AGENT, KA_CONTROL = "fz-keepalive", "fz-pinger"
LAPTOP = "fz-laptop"  # employee-1's laptop, opted out in the fixture
NOBODY = "fz-nobody"  # in the scope of the fixture holds; never connects
KNOWN_SUBJECTS = frozenset(
    {IC, APPROVER, "approver-2", "sre-1", "automation-1", EMPLOYEE, INGEST, GOOD, FUZZ_AGENT}
    | {CROWD}
    | {KA_AGENT, KA_CONTROL, LAPTOP, NOBODY}
)

# What agents use (agent_stub/agent.py); the simulator is deliberately not imported.
AGENT_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Our own reads (the audit log holds echoes of huge inputs) must not hit the client cap.
CLIENT_OPTIONS: list[tuple[str, Any]] = [("grpc.max_receive_message_length", -1)]
CALL_TIMEOUT = 10.0
HEARTBEAT_SECONDS = 0.3

CLEAN_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CONFLICT = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK
ALL = pb.Scope(all=True)
# ------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: tuple[bytes, ...] = ()

    def __str__(self) -> str:
        return f"{self.code.name} {self.details[:300]!r}"


def check(outcome: Outcome, what: object) -> None:
    """OK, or a deliberate refusal with a one-line message; never UNKNOWN or INTERNAL."""
    if outcome.code is grpc.StatusCode.OK:
        return
    context = f"{what!r:.600} -> {outcome}"
    assert outcome.code in CLEAN_REFUSALS, context
    assert outcome.details.strip(), f"empty details: {context}"
    assert "\n" not in outcome.details, f"multi-line details: {context}"
    assert "Traceback" not in outcome.details, context


def failed(exc: grpc.RpcError, replies: Sequence[bytes] = ()) -> Outcome:
    assert isinstance(exc, grpc.Call), exc
    return Outcome(exc.code(), exc.details() or "", tuple(replies))


def unary(
    channel: grpc.Channel,
    path: str,
    body: bytes | Message,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> Outcome:
    raw = body if isinstance(body, bytes) else body.SerializeToString()
    extra: tuple[tuple[str, str | bytes], ...] = tuple(metadata or ())
    try:
        reply = channel.unary_unary(path, None, None)(raw, timeout=CALL_TIMEOUT, metadata=extra)
    except grpc.RpcError as exc:
        return failed(exc)
    return Outcome(grpc.StatusCode.OK, "", (reply,))


def server_stream(channel: grpc.Channel, path: str, body: bytes | Message) -> Outcome:
    raw = body if isinstance(body, bytes) else body.SerializeToString()
    replies: list[bytes] = []
    try:
        for reply in channel.unary_stream(path, None, None)(raw, timeout=CALL_TIMEOUT):
            replies.append(reply)
    except grpc.RpcError as exc:
        return failed(exc, replies)
    return Outcome(grpc.StatusCode.OK, "", tuple(replies))


def bidi(channel: grpc.Channel, path: str, bodies: Sequence[bytes | Message]) -> Outcome:
    """Send every message, half-close, read to the end."""
    raw = [b if isinstance(b, bytes) else b.SerializeToString() for b in bodies]
    replies: list[bytes] = []
    try:
        for reply in channel.stream_stream(path, None, None)(iter(raw), timeout=CALL_TIMEOUT):
            replies.append(reply)
    except grpc.RpcError as exc:
        return failed(exc, replies)
    return Outcome(grpc.StatusCode.OK, "", tuple(replies))


def call(channel: grpc.Channel, path: str, body: bytes | Message) -> Outcome:
    """Whatever the method's shape (ListAgents streams, Connect is bidirectional)."""
    if path == CONNECT:
        return bidi(channel, path, [body])
    if path == OPERATOR + "ListAgents":
        return server_stream(channel, path, body)
    return unary(channel, path, body)


# ------------------------------------------------------------------ the fleet


def secure_channel(
    server: ServerProcess, identity_dir: Path, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    identity = load_identity(identity_dir)
    return grpc.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
        options=[*CLIENT_OPTIONS, *options],
    )


def readyz(server: ServerProcess) -> int:
    url = f"http://127.0.0.1:{server.http_port}/readyz"
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


class StreamingAgent:
    """A raw AgentControl.Connect stream: Hello, then whatever is put in its outbox.

    With ``well_behaved`` it acks every directive (MODE_ALLOWED) and heartbeats, as a
    real agent does; otherwise it stays silent after Hello until told to speak.
    """

    def __init__(
        self,
        server: ServerProcess,
        identity_dir: Path,
        agent_id: str,
        *,
        options: Sequence[tuple[str, Any]] = AGENT_CHANNEL_OPTIONS,
        well_behaved: bool = True,
    ) -> None:
        self.agent_id = agent_id
        self.well_behaved = well_behaved
        self.channel = secure_channel(server, identity_dir, options)
        self.directives: list[pb.Directive] = []
        self.error: grpc.RpcError | None = None
        self.ended_at: float | None = None
        self._outbox: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self._closing = threading.Event()
        self._first_directive = threading.Event()
        self._lease_requests = 0
        connect = self.channel.stream_stream(
            CONNECT,
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString,
        )
        self._call = connect(self._messages())
        self._reader = threading.Thread(target=self._read, name=f"agent-{agent_id}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.ended_at is None and self.error is None

    def send(self, message: pb.AgentMessage) -> None:
        self._outbox.put(message)

    def first_directive(self, timeout: float = 10.0) -> pb.Directive:
        assert self._first_directive.wait(timeout), f"{self.agent_id}: no directive"
        return self.directives[0]

    def _messages(self) -> Iterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(agent_id=self.agent_id, agent_version="fuzz/1"))
        while True:
            try:
                message = self._outbox.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                if not self.well_behaved:
                    continue
                applied = self.directives[-1].epoch if self.directives else 0
                message = pb.AgentMessage(heartbeat=pb.Heartbeat(applied_epoch=applied))
                # And renew its lease, as a real agent does: CAPTURING needs one.
                self._outbox.put(self._lease_request())
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for reply in self._call:
                if reply.WhichOneof("body") != "directive":
                    continue
                self.directives.append(reply.directive)
                self._first_directive.set()
                if self.well_behaved:
                    ack = pb.Ack(epoch=reply.directive.epoch, mode=pb.MODE_ALLOWED)
                    self.send(pb.AgentMessage(ack=ack))
                    self.send(self._lease_request())
        except grpc.RpcError as exc:
            if not self._closing.is_set():
                self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def _lease_request(self) -> pb.AgentMessage:
        self._lease_requests += 1
        return pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=self._lease_requests))

    def describe(self) -> str:
        error = None if self.error is None else failed(self.error)
        return f"{self.agent_id}: ended_at={self.ended_at} error={error}"

    def close(self) -> None:
        self._closing.set()
        self._outbox.put(None)
        self._reader.join(timeout=10)
        self.channel.close()
