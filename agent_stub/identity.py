"""The agent's mTLS identity: its own key, a certificate the control server signed, the CA.

An agent enrols once with a join token: it makes a key, sends a CSR to the
``Enrollment`` port (TLS that authenticates the server only) and keeps the
certificate it gets back in its state directory. Later starts reuse it until it
expires. This module ships with the agent, so it does not import ``control``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.wire_rules import INSECURE_IDENTITY_HEADER
from agent_stub.wire_rules import enrolment_port

CERT_FILE, KEY_FILE, CA_FILE = "cert.pem", "key.pem", "ca.pem"
AGENT_ROLE = "agent"
ENROL_TIMEOUT_SECONDS = 30.0
# Enrolments at once over the simulator's one connection: the enrolment port's HTTP/2
# stream limit (control.rpc.enrolment_gate.MAX_STREAMS_PER_CONNECTION).
ENROL_CONCURRENCY = 16
# A busy or flooded enrolment port answers RESOURCE_EXHAUSTED or UNAVAILABLE: tried this
# many times, waiting 0.5, 1, 2... s (with jitter) in between.
ENROL_ATTEMPTS = 6
ENROL_FIRST_BACKOFF_SECONDS = 0.5
BUSY = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 1, 2, 4
REFUSALS = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Distinct reasons named when many agents of a fleet fail to enrol.
REASONS_SHOWN = 3

Metadata = tuple[tuple[str, str], ...]


class EnrolmentError(Exception):
    """The agent has no usable identity; ``exit_code`` follows the CLI's convention."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """What an enrolled agent proves itself with and trusts the server by: one value,
    whether it was read back from the state directory or just issued, so the channel is
    built the same way after a restart as after enrolment."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def credentials(self) -> grpc.ChannelCredentials:
        """mTLS to the control server: trust only our CA, prove who we are with our cert."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def insecure_metadata(agent_id: str) -> Metadata:
    """Who we are, for a server without TLS, which cannot read it from a certificate."""
    return ((INSECURE_IDENTITY_HEADER, f"{agent_id}:{AGENT_ROLE}"),)


def default_enroll_target(server: str) -> str:
    """The enrolment port is the control port + 1 on the same host."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or int(port) >= 65535:
        raise EnrolmentError(
            f"cannot derive the enrolment address from --server {server!r}:"
            " pass --enroll-server HOST:PORT"
        )
    return f"{host}:{enrolment_port(int(port))}"


def read_ca(path: Path) -> bytes:
    """The CA certificate the agent trusts (pre-seeded by the fleet's MDM)."""
    try:
        ca_pem = path.read_bytes()
    except FileNotFoundError:
        raise EnrolmentError(
            f"no CA certificate at {path}: pass --ca FILE (the control server's pki/ca.pem)"
        ) from None
    except OSError as exc:
        raise EnrolmentError(f"cannot read {path}: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise EnrolmentError(f"{path} is not a PEM certificate") from None
    return ca_pem


def agent_state_dir(root: Path, agent_id: str) -> Path:
    """``root/<agent_id>``, for an id that is a plain file name."""
    if agent_id in {"", ".", ".."} or "/" in agent_id or "\0" in agent_id:
        raise EnrolmentError(f"agent id {agent_id!r} cannot name a state directory")
    return root / agent_id


# ------------------------------------------------------------------ stored identity


def load_enrolled(state_dir: Path, agent_id: str, ca_pem: bytes) -> AgentIdentity | None:
    """The identity stored in ``state_dir``, or None if the agent must enrol (again).

    That is: nothing stored yet, the certificate expired, or another CA issued it
    (the control server was re-initialised).
    """
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnrolmentError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise EnrolmentError(
            f"{cert_path} is not a PEM certificate: delete it to enrol again"
        ) from None
    owner = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in owner] != [agent_id]:
        raise EnrolmentError(
            f"{state_dir} holds the identity of {cert.subject.rfc4514_string()}, not {agent_id}"
        )
    if cert.not_valid_after_utc.timestamp() <= time.time() or not _chains_to(cert_pem, ca_pem):
        return None
    return AgentIdentity(cert_pem, key_pem, ca_pem)


def _chains_to(chain_pem: bytes, ca_pem: bytes) -> bool:
    """Whether the stored chain (leaf, then the agent CA that signed it) leads to a CA
    in ``ca_pem``: each certificate signed by the next, the last by that CA."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        return False
    anchors = x509.load_pem_x509_certificates(ca_pem)
    for cert, issuer in itertools.pairwise(chain):
        if not _issued_by(cert, [issuer]):
            return False
    return _issued_by(chain[-1], anchors)


def _issued_by(cert: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    for ca in issuers:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _store(state_dir: Path, identity: AgentIdentity) -> None:
    """Owner-only; the certificate last, so a half-written identity is never loaded."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
        for name, data in (
            (KEY_FILE, identity.key_pem),
            (CA_FILE, identity.ca_pem),
            (CERT_FILE, identity.cert_pem),
        ):
            _write_private(state_dir / name, data)
    except OSError as exc:
        raise EnrolmentError(
            f"cannot store the identity in {state_dir}: {exc.strerror}", EXIT_FAILED
        ) from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ enrolment


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """An EC P-256 key and a CSR proving we hold it.

    The CSR names nobody: the server writes the subject (CN=agent id, OU=agent)
    itself, whatever a CSR asks for.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def enrollment_channel(target: str, ca_pem: bytes) -> grpc.aio.Channel:
    """TLS that authenticates the server only: the agent has no certificate yet."""
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca_pem))


@dataclass(frozen=True, slots=True)
class _Enrolment:
    """What every certificate request of one enrolment shares: the enrolment port, the
    join token, and the CA that port must prove itself with."""

    target: str
    token: str
    ca_pem: bytes

    def channel(self) -> grpc.aio.Channel:
        return enrollment_channel(self.target, self.ca_pem)

    async def request_certificate(
        self, channel: grpc.aio.Channel, agent_id: str, state_dir: Path
    ) -> AgentIdentity:
        """Enrol ``agent_id`` over ``channel`` and store the new identity in ``state_dir``."""
        key, csr_pem = new_key_and_csr()
        request = pb.EnrollRequest(token=self.token, agent_id=agent_id, csr_pem=csr_pem.decode())
        response = await _enroll_call(channel, self.target, request)
        try:
            cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
        except ValueError:
            raise EnrolmentError(
                f"{self.target} returned no valid certificate", EXIT_FAILED
            ) from None
        if cert.public_key() != key.public_key():
            raise EnrolmentError(
                f"{self.target} returned a certificate for another key", EXIT_FAILED
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        identity = AgentIdentity(
            cert_pem=response.certificate_pem.encode(),
            key_pem=key_pem,
            ca_pem=response.ca_pem.encode() or self.ca_pem,
        )
        _store(state_dir, identity)
        return identity


async def _enroll_call(
    channel: grpc.aio.Channel, target: str, request: pb.EnrollRequest
) -> pb.EnrollResponse:
    """The call, tried again with backoff while the port is busy (its limits, a flood)."""
    backoff = ENROL_FIRST_BACKOFF_SECONDS
    for attempt in range(1, ENROL_ATTEMPTS + 1):
        try:
            return await pb_grpc.EnrollmentStub(channel).Enroll(
                request, timeout=ENROL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in BUSY or attempt == ENROL_ATTEMPTS:
                raise _rpc_failure(exc, target) from None
        await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff *= 2
    raise AssertionError("unreachable: the last attempt returns or raises")


def _rpc_failure(exc: grpc.aio.AioRpcError, target: str) -> EnrolmentError:
    code = exc.code()
    if code in UNREACHABLE:
        return EnrolmentError(
            f"cannot reach the enrolment server {target}: {exc.details()}", EXIT_UNREACHABLE
        )
    if code in REFUSALS:
        return EnrolmentError(f"enrolment refused by {target}: {exc.details()}")
    return EnrolmentError(
        f"enrolment failed at {target}: {code.name}: {exc.details()}", EXIT_FAILED
    )


def _require_token(token: str, missing: int) -> None:
    if not token:
        agents = "this agent is" if missing == 1 else f"{missing} agents are"
        raise EnrolmentError(f"{agents} not enrolled (or expired): pass --enroll-token TOKEN")


async def enrol(
    enroll_target: str, token: str, agent_id: str, state_dir: Path, ca_pem: bytes
) -> AgentIdentity:
    """The identity stored in ``state_dir`` while valid, else a new one enrolled with ``token``."""
    stored = load_enrolled(state_dir, agent_id, ca_pem)
    if stored is not None:
        return stored
    _require_token(token, 1)
    enrolment = _Enrolment(enroll_target, token, ca_pem)
    async with enrolment.channel() as channel:
        return await enrolment.request_certificate(channel, agent_id, state_dir)


async def enrol_fleet(
    enroll_target: str,
    token: str,
    agent_ids: Sequence[str],
    state_root: Path,
    ca_pem: bytes,
    *,
    concurrency: int = ENROL_CONCURRENCY,
) -> tuple[dict[str, AgentIdentity], int]:
    """Every agent's identity from ``state_root/<agent_id>``, enrolling those without one.

    Returns the identities and how many were enrolled now. If any agent could not
    enrol, raises one error counting the failures by reason (the others keep
    their new certificates, so a second run only retries the failed ones).
    """
    identities: dict[str, AgentIdentity] = {}
    for agent_id in agent_ids:
        stored = load_enrolled(agent_state_dir(state_root, agent_id), agent_id, ca_pem)
        if stored is not None:
            identities[agent_id] = stored
    missing = [a for a in agent_ids if a not in identities]
    if not missing:
        return identities, 0
    _require_token(token, len(missing))
    enrolment = _Enrolment(enroll_target, token, ca_pem)
    in_flight = asyncio.Semaphore(concurrency)
    failures: list[EnrolmentError] = []

    async def enrol_one(channel: grpc.aio.Channel, agent_id: str) -> None:
        state_dir = agent_state_dir(state_root, agent_id)
        async with in_flight:
            try:
                identities[agent_id] = await enrolment.request_certificate(
                    channel, agent_id, state_dir
                )
            except EnrolmentError as exc:
                failures.append(exc)

    async with enrolment.channel() as channel:
        await asyncio.gather(*(enrol_one(channel, agent_id) for agent_id in missing))
    if failures:
        reasons = Counter(str(f) for f in failures).most_common()
        shown = "; ".join(f"{reason} (x{count})" for reason, count in reasons[:REASONS_SHOWN])
        more = (
            f"; and {len(reasons) - REASONS_SHOWN} other reasons"
            if len(reasons) > REASONS_SHOWN
            else ""
        )
        raise EnrolmentError(
            f"{len(failures)} of {len(agent_ids)} agents could not enrol: {shown}{more}",
            failures[0].exit_code,
        )
    return identities, len(missing)
