"""The ingest gateway end to end: a real `killswitch serve` (mTLS), a real `killswitch ingest`,
and a raw gRPC client as the agent, with its own certificate.

What is checked is where data lands: the sink on disk (read back through the audited
export, checksums verified) and what the control plane shows (`killswitch agents --json`).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from control.ingest.checks import MAX_EVENTS_PER_BATCH
from control.ingest.sink import SEQUENCES_FILE
from control.ingest.sink_format import day_manifests
from control.ingest.sink_format import verified_records
from control.ingest.watch import FRESH_SECONDS
from control.pki import load_identity
from control.wire import INSECURE_IDENTITY_HEADER
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import agent_identity
from tests.conftest import free_port
from tests.conftest import terminate
from tests.conftest import wait_for

AGENT = "laptop-upload"


class GatewayProcess:
    """`killswitch ingest` in a subprocess, as the ingest-1 identity `init` created."""

    def __init__(self, server: ServerProcess, data_dir: Path) -> None:
        self.data_dir = data_dir
        credentials = (
            ["--identity", str(server.identity("ingest-1"))] if server.secure else ["--insecure"]
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.log_path = data_dir.parent / "ingest.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "killswitch"),
                    "ingest",
                    "--data-dir",
                    str(data_dir),
                    "--listen",
                    self.address,
                    "--control",
                    server.address,
                    *credentials,
                    "--metrics",
                    self.metrics_url.removeprefix("http://").removesuffix("/metrics"),
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._listening, 20, "the gateway's port")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited: {self.log_path.read_text()}")
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    def records(self, kind: str = "sink") -> int:
        """Batches the manifests hold (whole lines), whatever the day."""
        manifests = day_manifests(self.data_dir / kind)
        return sum(m.read_bytes().count(b"\n") for m in manifests)

    def metric(self, name: str) -> float:
        """One sample of the gateway's own /metrics, by its full name and labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:
            for family in text_string_to_metric_families(answer.read().decode()):
                for sample in family.samples:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    if (f"{sample.name}{{{labels}}}" if labels else sample.name) == name:
                        return float(sample.value)
        raise AssertionError(f"{name} not in the gateway's /metrics")

    def stop(self) -> None:
        terminate(self.proc)


class StreamAgent:
    """Connects to the control server as the agent: acks every directive in its mode,
    heartbeats with frozen counters and renews its lease while allowed. To the server
    it looks honest and, once paused, stopped, whatever it uploads to the gateway."""

    HEARTBEAT_SECONDS = 0.3

    def __init__(self, channel: grpc.Channel, agent_id: str) -> None:
        self._outbox: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self._applied: tuple[int, int] = (0, pb.MODE_UNSPECIFIED)
        connect = channel.stream_stream(
            "/killswitch.v1.AgentControl/Connect",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString,
        )
        self._outbox.put(pb.AgentMessage(hello=pb.Hello(agent_id=agent_id)))
        self._call = connect(self._messages())
        threading.Thread(target=self._read, daemon=True).start()

    def _messages(self) -> Iterator[pb.AgentMessage]:
        while True:
            try:
                message = self._outbox.get(timeout=self.HEARTBEAT_SECONDS)
            except queue.Empty:
                epoch, mode = self._applied
                yield pb.AgentMessage(heartbeat=pb.Heartbeat(applied_epoch=epoch))
                if mode == pb.MODE_ALLOWED:
                    yield pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=1))
                continue
            if message is None:
                return
            yield message

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # the call ends with the test
            for reply in self._call:
                if reply.WhichOneof("body") == "directive":
                    self._obey(reply.directive)

    def _obey(self, directive: pb.Directive) -> None:
        self._applied = (directive.epoch, directive.mode)
        self._outbox.put(pb.AgentMessage(ack=pb.Ack(epoch=directive.epoch, mode=directive.mode)))

    def close(self) -> None:
        self._outbox.put(None)


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def batch(
    sequence: int, *captured: float, agent_id: str = AGENT, payload: bytes = b"keys"
) -> pb.UploadBatchRequest:
    return pb.UploadBatchRequest(
        agent_id=agent_id,
        sequence=sequence,
        events=[pb.CaptureEvent(channel="keyboard", payload=payload) for _ in captured],
        captured_at_unix_nano=[int(at * 1e9) for at in captured],
        sent_at=ts(time.time()),
    )


def gateway_stub(gateway: GatewayProcess, identity_dir: Path) -> pb_grpc.IngestGatewayStub:
    identity = load_identity(identity_dir)
    credentials = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
    return pb_grpc.IngestGatewayStub(grpc.secure_channel(gateway.address, credentials))


def refused_with(call: object, code: grpc.StatusCode, words: str) -> None:
    assert isinstance(call, grpc.RpcError), call
    assert call.code() is code and words in (call.details() or ""), (call.code(), call.details())


def attempt(method: Any, request: object, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    """The answer, or the error the call ended with."""
    try:
        return method(request, timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc


def upload(stub: pb_grpc.IngestGatewayStub, request: pb.UploadBatchRequest) -> object:
    return attempt(stub.UploadBatch, request)


@pytest.fixture
def gateway(server: ServerProcess, tmp_path: Path) -> Iterator[GatewayProcess]:
    started = GatewayProcess(server, tmp_path / "ingest")
    yield started
    started.stop()


def test_the_gateway_lands_only_allowed_batches_and_turns_late_ones_into_evidence(
    server: ServerProcess, cli: Cli, gateway: GatewayProcess, tmp_path: Path
) -> None:
    identity = agent_identity(server, AGENT, tmp_path)
    other = agent_identity(server, "laptop-other", tmp_path)
    load = load_identity(identity)
    control = grpc.secure_channel(
        server.address, grpc.ssl_channel_credentials(load.ca_pem, load.key_pem, load.cert_pem)
    )
    agent = StreamAgent(control, AGENT)
    stub = gateway_stub(gateway, identity)
    wait_for(lambda: cli.agents().get(AGENT, {}).get("state") == "CAPTURING", 20, "a leased agent")

    # Allowed: it lands, and the export reads it back with its checksum verified.
    now = time.time()
    accepted = upload(stub, batch(1, now - 2, now - 1))
    assert isinstance(accepted, pb.UploadBatchResponse), accepted
    assert (accepted.accepted, accepted.next_sequence) == (True, 2)
    assert gateway.records() == 1
    out = tmp_path / "export.jsonl"
    exported = subprocess.run(
        [
            str(BIN / "killswitch"),
            "ingest",
            "export",
            "--data-dir",
            str(gateway.data_dir),
            "--agent",
            AGENT,
            "--out",
            str(out),
            "--reason",
            "INC-1 forensics",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["agent_id"], e["sequence"]) for e in events] == [(AGENT, 1), (AGENT, 1)]
    (logged,) = [
        json.loads(line) for line in (gateway.data_dir / "export.log").read_text().splitlines()
    ]
    assert (logged["agent_id"], logged["reason"], logged["events"]) == (AGENT, "INC-1 forensics", 2)

    # Hostile or malformed: a clear answer, and nothing lands.
    replay = upload(stub, batch(1, now - 1))
    assert isinstance(replay, pb.UploadBatchResponse)
    assert not replay.accepted and "replay" in replay.reason and replay.next_sequence == 2
    ahead = upload(stub, batch(5, now - 1))
    assert isinstance(ahead, pb.UploadBatchResponse)
    assert not ahead.accepted and "skips ahead" in ahead.reason and ahead.next_sequence == 2
    refused_with(
        upload(gateway_stub(gateway, other), batch(2, now - 1)),
        grpc.StatusCode.PERMISSION_DENIED,
        "agent laptop-other cannot upload as 'laptop-upload'",
    )
    refused_with(
        upload(gateway_stub(gateway, server.identity("ic-1")), batch(2, now - 1)),
        grpc.StatusCode.PERMISSION_DENIED,
        "may not call IngestGateway.UploadBatch",
    )
    refused_with(
        upload(stub, batch(2, time.time() + 120)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "in the future",
    )
    refused_with(
        upload(stub, batch(2, *[now - 1] * (MAX_EVENTS_PER_BATCH + 1), payload=b"")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"at most {MAX_EVENTS_PER_BATCH} per batch",
    )
    refused_with(
        upload(stub, batch(2, now - 1, payload=b"x" * (1024 * 1024 + 1))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "bytes: at most",
    )
    assert gateway.records() == 1

    # Paused, keeping spools: the agent acks (its stop time is set), but keeps capturing
    # and uploading; what it sends is refused, and quarantined for forensics.
    cli.pause("--all", "--reason", "leak", "--keep-spool")
    wait_for(lambda: cli.agents()[AGENT]["state"] != "CAPTURING", 20, "the agent's pause ack")
    # The gateway's standing copy is current again within its freshness bound (or no
    # longer used): past it, this batch is asked about.
    time.sleep(FRESH_SECONDS)
    before_stop = upload(stub, batch(2, now - 1))
    assert isinstance(before_stop, pb.UploadBatchResponse)
    assert not before_stop.accepted and "paused" in before_stop.reason
    time.sleep(3)  # beyond the skew allowance after its stop
    late = time.time() - 0.5
    after_stop = upload(stub, batch(2, late - 1, late))
    assert isinstance(after_stop, pb.UploadBatchResponse)
    assert not after_stop.accepted and after_stop.next_sequence == 2
    assert gateway.records() == 1, "nothing captured after the pause landed"
    assert gateway.records("quarantine") == 2
    shown = wait_for(
        lambda: (a := cli.agents()[AGENT])["state"] == "VIOLATION" and a,
        10,
        "the upload after the stop as violation evidence",
    )
    assert shown["uploads_refused"] >= 2 and shown["events_accepted_after_pause"] == 0
    assert shown["last_accepted_event_at"] is not None
    assert "after" in shown["reason"] and "2 events" in shown["reason"]

    # Fail closed: without the control plane nothing is accepted, nothing is buffered.
    server.kill9()
    cut_off = upload(stub, batch(2, time.time() - 1))
    refused_with(cut_off, grpc.StatusCode.UNAVAILABLE, "no answer from the control plane")
    assert (gateway.records(), gateway.records("quarantine")) == (1, 2)

    # The gateway's own figures say the same, outcome by outcome.
    outcomes = {
        o: gateway.metric(f'killswitch_ingest_batches_total{{outcome="{o}"}}')
        for o in ("accepted", "refused", "invalid", "unavailable")
    }
    # (The operator's upload was stopped by the role check before the handler: not counted.)
    assert outcomes == {"accepted": 1, "refused": 4, "invalid": 4, "unavailable": 1}, outcomes
    # Every decided batch was timed (accepted and refused; not the ones refused unasked).
    assert gateway.metric("killswitch_ingest_authorization_seconds_count") == 5
    assert gateway.metric("killswitch_ingest_commit_batches_sum") == 1
    agent.close()
    control.close()


def test_a_development_gateway_takes_claimed_identities_on_loopback_only(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server("--insecure")
    gateway = GatewayProcess(server, tmp_path / "ingest")
    try:
        stub = pb_grpc.IngestGatewayStub(grpc.insecure_channel(gateway.address))

        def as_(claim: str, request: pb.UploadBatchRequest) -> object:
            return attempt(stub.UploadBatch, request, ((INSECURE_IDENTITY_HEADER, claim),))

        now = time.time()
        # The gateway asked the control plane as ingest-1 (else: UNAVAILABLE), which
        # has never heard of this laptop.
        unknown = as_("laptop-dev:agent", batch(1, now - 1, agent_id="laptop-dev"))
        assert isinstance(unknown, pb.UploadBatchResponse), unknown
        assert not unknown.accepted and "unknown agent" in unknown.reason
        refused_with(
            as_("laptop-dev:agent", batch(1, now - 1, agent_id="laptop-other")),
            grpc.StatusCode.PERMISSION_DENIED,
            "cannot upload as",
        )
        refused_with(
            as_("ic-1:incident-commander", batch(1, now - 1, agent_id="ic-1")),
            grpc.StatusCode.PERMISSION_DENIED,
            "may not call",
        )
        # The handler is registered behind the authorization wrapper, with no interceptor
        # in front (control/rpc/handler_cache.py add_wrapped): these prove it is there.
        refused_with(
            attempt(stub.UploadBatch, batch(1, now - 1, agent_id="laptop-dev")),
            grpc.StatusCode.UNAUTHENTICATED,
            "send metadata",
        )
        raw = grpc.insecure_channel(gateway.address).unary_unary(
            "/killswitch.v1.IngestGateway/UploadBatch",
            request_serializer=None,
            response_deserializer=None,
        )
        refused_with(
            attempt(raw, b"\xff\xff\xff", ((INSECURE_IDENTITY_HEADER, "laptop-dev:agent"),)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed request: the message does not parse",
        )
        # A second gateway on the same directory would keep its own sequence numbers and
        # append to the same files: it refuses to start, in one line.
        argv = [str(BIN / "killswitch"), "ingest", "--insecure", "--data-dir"]
        argv += [str(gateway.data_dir), "--listen", f"127.0.0.1:{free_port()}"]
        second = subprocess.run(
            [*argv, "--control", server.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "is in use by another gateway" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert gateway.records() == 0
    finally:
        gateway.stop()


def test_a_gateway_killed_or_stopped_reopens_no_sequence(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    """Each agent's next sequence number lives in the gateway's memory, its manifests
    and (after a clean stop) a snapshot. Killed with SIGKILL, then stopped, the gateway
    comes back expecting the next number each time: a replay of an accepted batch is
    refused, the next lands, and the sink holds every batch exactly once."""
    identity = agent_identity(server, AGENT, tmp_path)
    load = load_identity(identity)
    control = grpc.secure_channel(
        server.address, grpc.ssl_channel_credentials(load.ca_pem, load.key_pem, load.cert_pem)
    )
    StreamAgent(control, AGENT)
    wait_for(lambda: cli.agents().get(AGENT, {}).get("state") == "CAPTURING", 20, "a leased agent")
    data_dir, sequence = tmp_path / "ingest", 0
    started: list[GatewayProcess] = []
    try:
        for ending in ("SIGKILL", "stop"):
            gateway = GatewayProcess(server, data_dir)
            started.append(gateway)
            stub = gateway_stub(gateway, identity)
            if sequence:  # back after a kill: the last accepted batch again is a replay
                replay = upload(stub, batch(sequence, time.time() - 1))
                assert isinstance(replay, pb.UploadBatchResponse) and not replay.accepted, replay
                assert replay.next_sequence == sequence + 1, replay
            for _ in range(2):
                sequence += 1
                landed = upload(stub, batch(sequence, time.time() - 1))
                assert isinstance(landed, pb.UploadBatchResponse) and landed.accepted, landed
            if ending == "SIGKILL":
                gateway.proc.kill()
                gateway.proc.wait()
            else:
                gateway.stop()
        restarted = GatewayProcess(server, data_dir)
        started.append(restarted)
        replay = upload(gateway_stub(restarted, identity), batch(sequence, time.time() - 1))
        restarted.stop()
    finally:  # a failed check leaves no gateway running
        for gateway in started:
            gateway.stop()
    assert isinstance(replay, pb.UploadBatchResponse) and not replay.accepted, replay
    assert "replay" in replay.reason and replay.next_sequence == sequence + 1
    assert (data_dir / "sink" / SEQUENCES_FILE).exists(), "a clean stop leaves its snapshot"
    stored = [entry.sequence for entry, _ in verified_records(data_dir, AGENT)]
    assert stored == list(range(1, sequence + 1))
