"""A fuzz campaign against a real server: every RPC's requests, runbook files, enrolment CSRs.

Not a test (too long for CI): it starts ``killswitch init`` + ``killswitch serve``
(mTLS, SQLite) in a temporary directory and sends ``--inputs`` requests, spread
over every method of every service the server offers (the gateway's own
``IngestGateway`` excepted), each as the identity that may call it:

- **requests**: random bytes, messages with random field values (long, empty,
  control characters, extreme numbers, unknown enum values, nested and repeated
  fields) built from the descriptors, and byte mutations of their encodings;
- **runbooks**: mutations of the shipped runbook files (lines dropped, repeated or
  swapped; YAML syntax, anchors, aliases, tags and deep nesting spliced in), to
  ``PlanRunbook``;
- **CSRs**: mutations of a valid CSR (PEM text and DER bytes), to ``Enroll`` with a
  join token of many uses.

A crash is an ``UNKNOWN`` or ``INTERNAL`` status, or the server process dying. A stall
is the server's event loop held 100 ms or more, as the server itself measures it
(``control/loop_lag.py``: a timer set every 20 ms that fires that late is logged as
``event_loop_stalled``, read here from the server's log). Also reported, as the
client sees it: ``GetStatus`` calls (ic-1, own channel, back to back) slower than
``--stall-ms``, each with the methods in flight at that moment; that view also holds
the fuzzing client's own scheduling (13 Python threads sharing one GIL) and the
machine's.

Run: ``.venv/bin/python -m bench.fuzz_campaign [--inputs 100000] [--seed 1]``.
"""

from __future__ import annotations

import base64
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from argparse import ArgumentParser
from collections import Counter
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from bench.hostile_documents import channel
from bench.hostile_documents import start_server
from bench.procs import Child
from bench.procs import install_cleanup
from bench.procs import stop_all
from control.domain.identity import Role
from control.pki import Authority
from control.pki import request_identity

REPO = Path(__file__).resolve().parent.parent
RUNBOOKS = sorted((REPO / "runbooks").glob("*.yaml"))
CRASHES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
SKIPPED_SERVICES = frozenset({"IngestGateway"})  # served by the gateway, not this server
OPERATORS = ("ic-1", "sre-1", "approver-1", "automation-1", "employee-1")
CALLERS = {"AgentControl": ("fuzz-agent",), "Ingest": ("ingest-1",), "SelfService": ("employee-1",)}
CAMPAIGN_IDENTITIES = frozenset({*OPERATORS, "fuzz-agent", "ingest-1"})
CALL_TIMEOUT = 10.0
# Connect and the watch streams stay open while the server has nothing to say.
STREAM_TIMEOUT = 1.0
NO_ENROLMENT_LIMIT = ("--enrol-rate", "1000000", "--enrol-burst", "1000000")
# Per identity the server allows 16 calls in flight; stay under it.
IN_FLIGHT = 6

TEXTS = [
    "", " ", "x", "a" * 64, "a" * 65, "a" * 4096, "é" * 300, "\x00", "\x07\n\r\t", "\u202e",
    "💥" * 50,
    "hold-0123456789ab", "req-0123456789ab", "laptop-00001", "ring=canary", "a=b,c=d", "=",
    "a" * 70_000, "INC-1", "-1", "1e309", "NaN", "../../etc/passwd", "%s%n", "' OR 1=1 --",
    "*", "&a [*a]", "{{", "}}", "<script>", "ic-1", "employee-1",
]  # fmt: skip
INTS = [0, 1, -1, 2, 255, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1]
YAML_SPLICES = [
    "&a ", "*a", "!!python/object:os.system ", "!!binary ", "<<: ", "? ", "- ", "{", "}", "[", "]",
    ": ", "|", ">", "#", "%YAML 1.1\n", "---\n", "...\n", "\t", "'", '"', "\\", "1" * 200,
    "0x" + "f" * 300, "[" * 50, "{a: " * 30, "~", "null", ".inf", "-.nan", "\x85", "\ufeff",
    "2001-12-14t21:59:43.10-05:00",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    request: type[Message]
    callers: tuple[str, ...]
    streaming_response: bool
    streaming_request: bool


def callers(service: str) -> tuple[str, ...]:
    return ("enroll",) if service == "Enrollment" else CALLERS.get(service, OPERATORS)


def targets() -> list[Target]:
    found = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        if service.name in SKIPPED_SERVICES:
            continue
        method: MethodDescriptor
        for method in service.methods:
            found.append(
                Target(
                    f"/{service.full_name}/{method.name}",
                    getattr(pb, method.input_type.name),
                    callers(service.name),
                    method.server_streaming,
                    method.client_streaming,
                )
            )  # fmt: skip
    return found


# ---------------------------------------------------------------- inputs


def fill(rng: random.Random, message: Message, depth: int) -> None:
    field: Any
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target = getattr(message, field.name)
                for _ in range(rng.randrange(4)):
                    key = scalar(rng, field.message_type.fields_by_name["key"])
                    value_field = field.message_type.fields_by_name["value"]
                    if value_field.message_type is None:
                        target[key] = scalar(rng, value_field)
                    elif depth < 3:
                        fill(rng, target[key], depth + 1)
            elif field.is_repeated:
                target = getattr(message, field.name)
                for _ in range(rng.choice((0, 1, 2, 5, 50))):
                    if field.message_type is not None:
                        if depth < 3:
                            fill(rng, target.add(), depth + 1)
                    else:
                        target.append(scalar(rng, field))
            elif field.message_type is not None:
                if depth < 3:
                    fill(rng, getattr(message, field.name), depth + 1)
                    if field.message_type.full_name == "google.protobuf.Timestamp":
                        getattr(message, field.name).seconds = rng.choice(INTS[:9])
            else:
                setattr(message, field.name, scalar(rng, field))
        except (ValueError, TypeError):
            continue  # a value protobuf itself refuses to hold (out of range)


def scalar(rng: random.Random, field: Any) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(TEXTS) if rng.random() < 0.8 else random_text(rng)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 16, 300)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan"), rng.random()))
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99, -1])
    return rng.choice(INTS)


def random_text(rng: random.Random) -> str:
    """ASCII and the first 12k code points (surrogates, controls, combining marks)."""
    return "".join(
        chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x3000))))
        for _ in range(rng.randrange(0, 80))
    )


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        choice = rng.randrange(5)
        at = rng.randrange(len(buffer) + 1)
        if choice == 0 and buffer:
            buffer[min(at, len(buffer) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buffer[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif choice == 2:
            del buffer[at : at + rng.randrange(1, 8)]
        elif choice == 3:
            buffer = buffer[:at]
        else:
            buffer[at:at] = buffer[max(0, at - 16) : at]
    return bytes(buffer)


def request_bytes(rng: random.Random, target: Target) -> bytes:
    roll = rng.random()
    if roll < 0.2:
        return rng.randbytes(rng.choice((0, 1, 5, 40, 400)))
    message = target.request()
    fill(rng, message, 0)
    encoded = message.SerializeToString()
    return encoded if roll < 0.6 else mutate(rng, encoded)


def sparing_the_campaign(target: Target, body: bytes) -> bytes:
    """An incident commander may revoke anyone, itself included: a fuzzed
    ``RevokeCertificates`` naming one of the campaign's own identities would leave the
    rest of the campaign (and the stall watch) refused, so it names someone else."""
    if not target.path.endswith("/RevokeCertificates"):
        return body
    try:
        request = pb.RevokeCertificatesRequest.FromString(body)
    except DecodeError:
        return body  # refused by the server as it is
    if request.subject_or_serial not in CAMPAIGN_IDENTITIES:
        return body
    request.subject_or_serial = "fuzz-someone-else"
    return request.SerializeToString()


def runbook_text(rng: random.Random, sources: list[str]) -> str:
    lines = rng.choice(sources).splitlines(keepends=True)
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(len(lines))
        choice = rng.randrange(5)
        if choice == 0:
            del lines[at]
        elif choice == 1:
            lines.insert(at, lines[at])
        elif choice == 2:
            other = rng.randrange(len(lines))
            lines[at], lines[other] = lines[other], lines[at]
        else:
            line = lines[at]
            cut = rng.randrange(len(line) + 1)
            lines[at] = line[:cut] + rng.choice(YAML_SPLICES) + line[cut:]
        if not lines:
            lines = ["name: x\n"]
    return "".join(lines)


def csr_variants() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), csr.public_bytes(
        serialization.Encoding.DER
    )


def csr_pem(rng: random.Random, pem: bytes, der: bytes) -> str:
    if rng.random() < 0.5:
        return mutate(rng, pem).decode("utf-8", "replace")
    body = base64.encodebytes(mutate(rng, der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


# ---------------------------------------------------------------- the campaign


class Campaign:
    def __init__(self, data_dir: Path, address: str, enroll_address: str, token: str) -> None:
        self.data_dir = data_dir
        self.address = address
        self.enroll_address = enroll_address
        self.token = token
        self.codes: Counter[tuple[str, str]] = Counter()
        self.crashes: list[str] = []
        self.in_flight: dict[int, str] = {}
        self.stalls: list[tuple[float, list[str]]] = []
        self.status_calls = 0
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, caller: str) -> grpc.Channel:
        with self._lock:
            if caller not in self._channels:
                if caller == "enroll":
                    ca = (self.data_dir / "pki" / "ca.pem").read_bytes()
                    self._channels[caller] = grpc.secure_channel(
                        self.enroll_address, grpc.ssl_channel_credentials(ca)
                    )
                else:
                    self._channels[caller] = channel(self.data_dir, self.address, caller)
            return self._channels[caller]

    def send(self, kind: str, target: Target, caller: str, body: bytes) -> None:
        key = threading.get_ident()
        self.in_flight[key] = target.path.rsplit("/", 1)[1]
        chan = self.channel(caller)
        try:
            if target.streaming_request:
                call: Any = chan.stream_stream(target.path, None, None)(
                    iter([body]), timeout=STREAM_TIMEOUT
                )
                for _ in call:
                    pass
            elif target.streaming_response:
                for _ in chan.unary_stream(target.path, None, None)(body, timeout=STREAM_TIMEOUT):
                    pass
            else:
                chan.unary_unary(target.path, None, None)(body, timeout=CALL_TIMEOUT)
            code = grpc.StatusCode.OK
            details = ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        finally:
            self.in_flight.pop(key, None)
        self.codes[(kind, code.name)] += 1
        if code in CRASHES:
            self.crashes.append(
                f"{kind} {target.path} as {caller}: {code.name} {details[:200]!r}"
                f" input={body[:300]!r}"
            )

    def watch(self, done: threading.Event, stall_seconds: float) -> None:
        stub = pb_grpc.OperatorStub(channel(self.data_dir, self.address, "ic-1"))
        while not done.is_set():
            started = time.perf_counter()
            try:
                stub.GetStatus(pb.GetStatusRequest(), timeout=30)
            except grpc.RpcError as exc:
                self.crashes.append(f"status: {exc.code().name}")
            took = time.perf_counter() - started
            self.status_calls += 1
            if took > stall_seconds:
                self.stalls.append((took, sorted(set(self.in_flight.values()))))
            time.sleep(0.01)


def inputs(
    rng: random.Random, total: int, csr: tuple[bytes, bytes], token: str
) -> Iterator[tuple[str, Target, str, bytes]]:
    every = targets()
    plan = next(t for t in every if t.path.endswith("/PlanRunbook"))
    enroll = next(t for t in every if t.path.endswith("/Enroll"))
    sources = [p.read_text() for p in RUNBOOKS]
    for n in range(total):
        roll = n % 10
        if roll < 6:
            target = every[n % len(every)]
            body = sparing_the_campaign(target, request_bytes(rng, target))
            yield "request", target, rng.choice(target.callers), body
        elif roll < 9:
            text = runbook_text(rng, sources)
            source = pb.RunbookSource(text=text, file_name="fuzz.yaml")
            body = pb.PlanRunbookRequest(runbook=source).SerializeToString()
            yield (
                "runbook",
                plan,
                rng.choice(("sre-1", "approver-1", "automation-1")),
                body,
            )
        else:
            request = pb.EnrollRequest(
                token=token, agent_id=f"fuzz-{n}", csr_pem=csr_pem(rng, *csr)
            )
            body = request.SerializeToString()
            yield "csr", enroll, "enroll", body


def issue_agent(data_dir: Path, name: str) -> None:
    """An agent identity in ``DATA/identities/NAME``, as enrolment would give it."""
    folder = data_dir / "identities" / name
    authority = Authority.load(data_dir)
    csr = request_identity(folder, name, Role.AGENT)
    cert, _ = authority.sign_agent_csr(csr, name, now=time.time())
    (folder / "cert.pem").write_bytes(cert)
    (folder / "ca.pem").write_bytes(authority.ca_pem)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall-ms", type=float, default=100.0)
    args = parser.parse_args()
    print(
        "command:",
        shlex.join([Path(sys.executable).name, "-m", "bench.fuzz_campaign", *sys.argv[1:]]),
        flush=True,
    )
    install_cleanup()
    rng = random.Random(args.seed)
    # On tmpfs when there is one: the refusals are audited, and fsync would set the pace.
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="fuzz-", dir=scratch) as tmp:
        data_dir = Path(tmp)
        # Every CSR reaches the parser: failed enrolments are not rate-limited here (the
        # limit itself is tested; held 1 s each, they would set the campaign's pace).
        server, address, enroll_address = start_server(data_dir, *NO_ENROLMENT_LIMIT)
        try:
            issue_agent(data_dir, "fuzz-agent")
            ic = pb_grpc.OperatorStub(channel(data_dir, address, "ic-1"))
            request = pb.CreateEnrollTokenRequest(uses=100_000, ttl_seconds=86_400)
            token = ic.CreateEnrollToken(request, timeout=30).token
            campaign = Campaign(data_dir, address, enroll_address, token)
            done = threading.Event()
            watcher = threading.Thread(
                target=campaign.watch, args=(done, args.stall_ms / 1000), daemon=True
            )
            watcher.start()
            started = time.monotonic()
            try:
                fire(campaign, server, inputs(rng, args.inputs, csr_variants(), token), started)
            finally:
                done.set()
            watcher.join()
            callers = len({*OPERATORS, "fuzz-agent", "ingest-1", "enroll"})
            report(campaign, server.alive(), time.monotonic() - started, callers)
            report_loop_stalls(data_dir / "server.log")
        finally:
            stop_all()


def fire(
    campaign: Campaign,
    server: Child,
    queued: Iterator[tuple[str, Target, str, bytes]],
    started: float,
) -> None:
    """Every input, ``IN_FLIGHT * 2`` at a time; stop early if the server died."""
    with ThreadPoolExecutor(IN_FLIGHT * 2) as pool:
        window: deque[Future[None]] = deque()
        for n, (kind, target, caller, body) in enumerate(queued):
            window.append(pool.submit(campaign.send, kind, target, caller, body))
            if len(window) >= IN_FLIGHT * 2:
                window.popleft().result()
            if n % 10_000 == 0:
                progress(campaign, n, time.monotonic() - started, server.alive())
                if not server.alive():
                    campaign.crashes.append("server process died")
                    break
        for future in window:
            future.result()


def progress(campaign: Campaign, inputs: int, seconds: float, alive: bool) -> None:
    print(
        f"  {inputs} inputs, {seconds:.0f} s, crashes {len(campaign.crashes)},"
        f" slow status calls {len(campaign.stalls)}, server alive {alive}",
        flush=True,
    )


def report(campaign: Campaign, alive: bool, seconds: float, callers: int) -> None:
    total = sum(campaign.codes.values())
    print(
        f"{total} inputs in {seconds:.0f} s from {callers} identities;"
        f" server alive at the end: {alive}"
    )
    by_kind: dict[str, Counter[str]] = {}
    for (kind, code), count in campaign.codes.items():
        by_kind.setdefault(kind, Counter())[code] = count
    for kind, codes in sorted(by_kind.items()):
        print(f"  {kind:<8} {sum(codes.values()):>7}  {dict(codes.most_common())}")
    print(f"crashes (UNKNOWN/INTERNAL or death): {len(campaign.crashes)}")
    for line in campaign.crashes[:20]:
        print("  ", line)
    stalls = sorted(campaign.stalls, reverse=True)
    print(
        f"slow GetStatus calls (the client's view): {len(stalls)} of {campaign.status_calls}"
        " over the limit"
    )
    for took, flying in stalls[:10]:
        print(f"   {took * 1000:.0f} ms, in flight: {', '.join(flying)}")


def report_loop_stalls(server_log: Path) -> None:
    """The server's own count of event-loop stalls (lag >= 100 ms), from its log."""
    stalls = []
    for line in server_log.read_text(errors="replace").splitlines():
        if '"event_loop_stalled"' in line:
            stalls.append(float(json.loads(line)["seconds"]))
    longest = f", longest {max(stalls) * 1000:.0f} ms" if stalls else ""
    print(f"server event-loop stalls (>= 100 ms, the server's own measure): {len(stalls)}{longest}")


if __name__ == "__main__":
    main()
