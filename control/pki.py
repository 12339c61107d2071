"""The control plane's own certificate authority, and who a client certificate names.

Every caller of the main gRPC port presents a certificate this CA issued: its
subject CN is the principal's name and its OU the role. The CA key never leaves
``DATA/pki``; agents get certificates by sending a CSR to the enrolment port, and
the server decides everything in them except the public key.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.domain import validate_agent_id
from control.domain.identity import CertificateRecord, Principal, Role
from control.errors import Conflict, InvalidInput, KillswitchError, PermissionDenied, shown

PKI_DIR = "pki"
IDENTITIES_DIR = "identities"
CA_CERT_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server-key.pem"
CERT_FILE, KEY_FILE = "cert.pem", "key.pem"

CA_DAYS = 3650
SERVER_DAYS = 365
OPERATOR_DAYS = 365
AGENT_DAYS = 90
# Certificates start a minute early so a client whose clock is slightly behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=1)
MAX_CSR_BYTES = 8 * 1024
MIN_RSA_BITS = 2048
# X.509 caps a subject CN at 64 characters (RFC 5280 ub-common-name).
MAX_NAME_LENGTH = 64
# One entry per connected certificate: a 10,000-agent fleet stays cached.
PRINCIPAL_CACHE_SIZE = 16_384
SERVER_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
# The server certificate's subject; unlike every client certificate, it has no role (OU).
SERVER_COMMON_NAME = "killswitch server"

DEFAULT_OPERATORS: tuple[tuple[str, Role], ...] = (
    ("ic-1", Role.INCIDENT_COMMANDER),
    ("approver-1", Role.APPROVER),
    ("approver-2", Role.APPROVER),
    ("sre-1", Role.SRE),
    ("automation-1", Role.AUTOMATION),
    ("employee-1", Role.EMPLOYEE),
    ("ingest-1", Role.INGEST),
)

LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# Operator names double as directory names under DATA/identities: no separators, no dots first.
_IDENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DNS_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a client needs for mTLS: its certificate and key, and the CA to trust."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


# ------------------------------------------------------------------ set-up


def initialise(
    data_dir: Path, *, server_names: Sequence[str] = (), now: float
) -> list[CertificateRecord]:
    """Create the CA, the server certificate and the ``DEFAULT_OPERATORS`` identities.

    Returns a record for each client certificate (the six operators) so the
    caller can register them; the server certificate has no role and no record.
    ``ca.pem`` is written last, so an interrupted run can simply be repeated.
    """
    pki = data_dir / PKI_DIR
    ca_path = pki / CA_CERT_FILE
    if ca_path.exists():
        raise Conflict(f"already initialised: {ca_path} exists")
    extra_names = [_server_name(name) for name in server_names]
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, _utc(now))
    server_key = _new_key()
    server_cert = _server_certificate(server_key, extra_names, ca_cert, ca_key, now)
    authority = Authority(ca_cert, ca_key, _cert_pem(server_cert), _private_pem(server_key))

    _make_private_dir(pki)
    _write_private(pki / CA_KEY_FILE, _private_pem(ca_key))
    _write_private(pki / SERVER_KEY_FILE, authority.server_key_pem)
    _write_private(pki / SERVER_CERT_FILE, authority.server_cert_pem)
    records = []
    for name, role in DEFAULT_OPERATORS:
        # The ingest gateway also serves agents with its certificate, under the server's names.
        names = [*SERVER_DEFAULT_NAMES, *server_names] if role is Role.INGEST else []
        cert_pem, key_pem, record = authority.issue_identity(
            name, role, now=now, server_names=names
        )
        write_identity(data_dir / IDENTITIES_DIR / name, cert_pem, key_pem, authority.ca_pem)
        records.append(record)
    _write_private(ca_path, authority.ca_pem)
    return records


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "killswitch CA")])
    public = key.public_key()
    return (
        _validity(x509.CertificateBuilder(), now, CA_DAYS)
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    extra_names: Sequence[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: float,
) -> x509.Certificate:
    defaults = [_server_name(name) for name in SERVER_DEFAULT_NAMES]
    names = list(dict.fromkeys([*defaults, *extra_names]))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_COMMON_NAME)])
    builder = (
        _validity(x509.CertificateBuilder(), _utc(now), SERVER_DAYS)
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return _sign_leaf(builder, key.public_key(), ca_cert, ca_key)


def _server_name(text: str) -> x509.GeneralName:
    """An extra server name: an IP address if it parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _DNS_NAME.match(text):
        raise InvalidInput(f"bad server name {text!r}: expected a DNS name or an IP address")
    return x509.DNSName(text)


# ------------------------------------------------------------------ the authority


class Authority:
    """Issues certificates with the CA key; ``load`` reads it from ``DATA/pki``."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        server_cert_pem: bytes,
        server_key_pem: bytes,
    ) -> None:
        self._ca_cert = ca_cert
        self._ca_key = ca_key
        self.ca_pem = _cert_pem(ca_cert)
        self.server_cert_pem = server_cert_pem
        self.server_key_pem = server_key_pem

    @classmethod
    def load(cls, data_dir: Path) -> Authority:
        pki = data_dir / PKI_DIR
        if not (pki / CA_CERT_FILE).exists():
            raise KillswitchError(
                f"no CA in {pki}: run `killswitch init --data-dir {data_dir}` first"
            )
        ca_pem, ca_key_pem, server_cert_pem, server_key_pem = (
            _read(pki / name)
            for name in (CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)
        )
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_pem)
            ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
        except ValueError as exc:
            raise KillswitchError(f"unreadable CA in {pki}: {exc}") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise KillswitchError(f"unreadable CA in {pki}: {CA_KEY_FILE} is not an EC key")
        return cls(ca_cert, ca_key, server_cert_pem, server_key_pem)

    def issue_identity(
        self,
        name: str,
        role: Role,
        *,
        now: float,
        days: int = OPERATOR_DAYS,
        server_names: Sequence[str] = (),
    ) -> tuple[bytes, bytes, CertificateRecord]:
        """A new key and a client certificate for ``name`` in ``role``; with
        ``server_names`` it may also serve TLS under them (the ingest gateway does)."""
        if not _IDENTITY_NAME.match(name):
            raise InvalidInput(
                f"invalid identity name {shown(name)}: use 1-64 letters, digits or . _ @ -"
                " starting with a letter or digit"
            )
        key = _new_key()
        cert_pem, record = self._client_certificate(
            key.public_key(),
            name,
            role,
            now,
            days,
            server_names=[_server_name(n) for n in server_names],
        )
        return cert_pem, _private_pem(key), record

    def sign_agent_csr(
        self, csr_pem: bytes | str, agent_id: str, *, now: float
    ) -> tuple[bytes, CertificateRecord]:
        """A certificate for ``agent_id`` on the CSR's key; nothing else of the CSR is used."""
        validate_agent_id(agent_id)
        if len(agent_id) > MAX_NAME_LENGTH:
            raise InvalidInput(
                f"agent id {agent_id!r} is too long for a certificate:"
                f" at most {MAX_NAME_LENGTH} characters"
            )
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(data) > MAX_CSR_BYTES:
            raise InvalidInput(f"CSR too large: {len(data)} bytes, at most {MAX_CSR_BYTES}")
        try:
            csr = x509.load_pem_x509_csr(data)
            public_key = csr.public_key()
            signed = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm):
            raise InvalidInput("malformed CSR: expected one PEM certificate request") from None
        if not _acceptable_key(public_key):
            raise InvalidInput(
                f"CSR key refused: use EC P-256 or RSA of at least {MIN_RSA_BITS} bits"
            )
        if not signed:
            raise InvalidInput("CSR signature does not verify")
        return self._client_certificate(public_key, agent_id, Role.AGENT, now, AGENT_DAYS)

    def _client_certificate(
        self,
        public_key: LeafPublicKey,
        name: str,
        role: Role,
        now: float,
        days: int,
        *,
        server_names: Sequence[x509.GeneralName] = (),
    ) -> tuple[bytes, CertificateRecord]:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            ]
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = _validity(x509.CertificateBuilder(), _utc(now), days).subject_name(subject)
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            names = list(dict.fromkeys(server_names))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = _sign_leaf(builder, public_key, self._ca_cert, self._ca_key)
        record = CertificateRecord(
            serial=_serial_hex(cert),
            subject=name,
            role=role,
            not_after=cert.not_valid_after_utc.timestamp(),
            issued_at=now,
        )
        return _cert_pem(cert), record


def _sign_leaf(
    builder: x509.CertificateBuilder,
    public_key: LeafPublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """Finish a leaf certificate with what every leaf shares: issuer, serial, key usage."""
    return (
        builder.public_key(public_key)
        .issuer_name(ca_cert.subject)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _acceptable_key(key: object) -> TypeGuard[LeafPublicKey]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, ec.SECP256R1)
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS


# ------------------------------------------------------------------ who is calling


@functools.lru_cache(maxsize=PRINCIPAL_CACHE_SIZE)
def principal_from_pem(cert_pem: bytes) -> Principal:
    """The principal a verified peer certificate names (cached: it runs on every call)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PermissionDenied("unreadable client certificate") from None
    name = _single_attribute(cert, NameOID.COMMON_NAME)
    if not name:
        raise PermissionDenied("certificate has no name (CN)")
    unit = _single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not unit:
        raise PermissionDenied("certificate has no role (OU)")
    try:
        role = Role(unit)
    except ValueError:
        raise PermissionDenied(f"certificate role {unit!r} is not a known role") from None
    return Principal(name=name, role=role, serial=_serial_hex(cert))


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    """The subject's one value for ``oid``; '' when absent or ambiguous (given twice)."""
    values = cert.subject.get_attributes_for_oid(oid)
    return values[0].value if len(values) == 1 and isinstance(values[0].value, str) else ""


# ------------------------------------------------------------------ identity files


def write_identity(directory: Path, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
    """Store a client identity owner-only; the certificate last, as the sign it is whole."""
    _make_private_dir(directory)
    _write_private(directory / KEY_FILE, key_pem)
    _write_private(directory / CA_CERT_FILE, ca_pem)
    _write_private(directory / CERT_FILE, cert_pem)


def load_identity(directory: Path) -> Identity:
    return Identity(
        cert_pem=_read(directory / CERT_FILE),
        key_pem=_read(directory / KEY_FILE),
        ca_pem=_read(directory / CA_CERT_FILE),
    )


# ------------------------------------------------------------------ helpers


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, datetime.UTC)


def _validity(
    builder: x509.CertificateBuilder, now: datetime.datetime, days: int
) -> x509.CertificateBuilder:
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents owner-only; existing directories are left alone."""
    missing = list(itertools.takewhile(lambda p: not p.is_dir(), (path, *path.parents)))
    try:
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o700)
    except OSError as exc:
        raise KillswitchError(f"cannot create directory {exc.filename}: {exc.strerror}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only whatever the umask, and whole or not at all (written beside, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise KillswitchError(f"cannot write {path}: {exc.strerror}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KillswitchError(f"missing {path}") from None
    except OSError as exc:
        raise KillswitchError(f"cannot read {path}: {exc.strerror}") from None
