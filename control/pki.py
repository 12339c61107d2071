"""The control plane's certificate authorities, and who a client certificate names.

Two CAs, so that no server holds the power to mint people:

- the **root** (``ca.pem``/``ca-key.pem``) signs the server certificate, the agent CA and
  every operator identity. Its key is used offline, where an administrator keeps it
  (``killswitch init`` and ``killswitch certs issue``); replicas never read it.
- the **agent CA** (``agent-ca.pem``/``agent-ca-key.pem``), an intermediate the root
  signed with path length 0, is the only key a replica holds: it signs the agent
  certificates the enrolment port hands out. The server refuses any other role it
  signed, so a stolen replica can mint laptops, never incident commanders.

Every caller of the main gRPC port presents a certificate from this hierarchy: its
subject CN is the principal's name and its OU the role. People make their own keys
(``killswitch identity request``); only their CSRs travel.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from control.domain import validate_agent_id
from control.domain.identity import CertificateRecord
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.scope import validate_name
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import PermissionDenied
from control.pki_files import load_certificate
from control.pki_files import load_key
from control.pki_files import make_private_dir
from control.pki_files import read_file
from control.pki_files import write_private

PKI_DIR = "pki"
IDENTITIES_DIR = "identities"
CA_CERT_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
AGENT_CA_CERT_FILE, AGENT_CA_KEY_FILE = "agent-ca.pem", "agent-ca-key.pem"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server-key.pem"
CERT_FILE, KEY_FILE, CSR_FILE = "cert.pem", "key.pem", "request.csr"
# What a replica needs from DATA/pki: everything but the root key.
REPLICA_FILES = (
    CA_CERT_FILE,
    AGENT_CA_CERT_FILE,
    AGENT_CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)
# The one identity `init` makes: the administrator who issues everyone else's.
BOOTSTRAP_ADMIN = "admin"

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
ROOT_CA_NAME, AGENT_CA_NAME = "killswitch CA", "killswitch agent CA"

LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# Operator names double as directory names: no separators, no dots first.
_IDENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DNS_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a client needs for mTLS: its certificate and key, and the CA to trust."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True, slots=True)
class _Signer:
    """A CA certificate and its key: what signs a leaf."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# ------------------------------------------------------------------ set-up


def initialise(
    data_dir: Path, *, server_names: Sequence[str] = (), now: float
) -> CertificateRecord:
    """Create the root CA, the agent CA, the server certificate and the bootstrap admin.

    Returns the admin's certificate record so the caller can register it. No other
    person's key is made here: each makes their own (``request_identity``) and the
    admin signs it (``RootAuthority.issue``). ``ca.pem`` is written last, so an
    interrupted run can simply be repeated.
    """
    pki = data_dir / PKI_DIR
    ca_path = pki / CA_CERT_FILE
    if ca_path.exists():
        raise Conflict(f"already initialised: {ca_path} exists")
    extra_names = [_server_name(name) for name in server_names]
    root = _Signer(*_self_signed_root(now))
    agent_ca_key = _new_key()
    agent_ca = _agent_ca_certificate(agent_ca_key, root, now)
    server_key = _new_key()
    server_cert = _server_certificate(server_key, extra_names, root, now)

    make_private_dir(pki)
    write_private(pki / CA_KEY_FILE, _private_pem(root.key))
    write_private(pki / AGENT_CA_KEY_FILE, _private_pem(agent_ca_key))
    write_private(pki / AGENT_CA_CERT_FILE, _cert_pem(agent_ca))
    write_private(pki / SERVER_KEY_FILE, _private_pem(server_key))
    write_private(pki / SERVER_CERT_FILE, _cert_pem(server_cert))
    admin_dir = data_dir / IDENTITIES_DIR / BOOTSTRAP_ADMIN
    csr_pem = request_identity(admin_dir, BOOTSTRAP_ADMIN, Role.ADMIN)
    cert_pem, record = RootAuthority(root.cert, root.key).issue(csr_pem, Role.ADMIN, now=now)
    root_pem = _cert_pem(root.cert)
    write_private(admin_dir / CA_CERT_FILE, root_pem)
    write_private(admin_dir / CERT_FILE, cert_pem)
    write_private(ca_path, root_pem)
    return record


def _self_signed_root(now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The root: path length 1, so exactly one level of CA (the agent CA) may sit below."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ROOT_CA_NAME)])
    cert = _ca_builder(key.public_key(), name, now, path_length=1).issuer_name(name)
    return cert.sign(key, hashes.SHA256()), key


def _agent_ca_certificate(
    key: ec.EllipticCurvePrivateKey, root: _Signer, now: float
) -> x509.Certificate:
    """The replicas' CA: path length 0 (it signs leaves only) and, by the server's
    rule, agent leaves only (``Authority.principal_from_pem``)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT_CA_NAME)])
    builder = _ca_builder(key.public_key(), name, now, path_length=0).issuer_name(root.cert.subject)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
    )
    return builder.sign(root.key, hashes.SHA256())


def _ca_builder(
    public: ec.EllipticCurvePublicKey, name: x509.Name, now: float, *, path_length: int
) -> x509.CertificateBuilder:
    return (
        _validity(x509.CertificateBuilder(), _utc(now), CA_DAYS)
        .subject_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    extra_names: Sequence[x509.GeneralName],
    root: _Signer,
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
    return _sign_leaf(builder, key.public_key(), root)


def _server_name(text: str) -> x509.GeneralName:
    """An extra server name: an IP address if it parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _DNS_NAME.match(text):
        raise InvalidInput(f"bad server name {text!r}: expected a DNS name or an IP address")
    return x509.DNSName(text)


# ------------------------------------------------------------------ a person's own key


def request_identity(directory: Path, name: str, role: Role) -> bytes:
    """Make a key in ``directory`` (owner-only; it never leaves) and return a CSR for it.

    The CSR names the person (CN) and the role they ask for (OU); the administrator
    who signs it decides the role. An existing key is never overwritten.
    """
    validate_identity_name(name)
    if (directory / KEY_FILE).exists():
        raise Conflict(f"{directory / KEY_FILE} exists: choose another --out, or delete it first")
    key = _new_key()
    csr_pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(name, role))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    make_private_dir(directory)
    write_private(directory / KEY_FILE, _private_pem(key))
    write_private(directory / CSR_FILE, csr_pem)
    return csr_pem


def validate_identity_name(name: str) -> str:
    return validate_name(
        name, _IDENTITY_NAME, what="identity name", allowed="1-64 letters, digits or . _ @ -"
    )


# ------------------------------------------------------------------ the root, offline


class RootAuthority:
    """The root CA, where its key is (the administrator's machine): signs people.

    ``load`` reads ``DATA/pki/ca-key.pem``; no server ever calls it.
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self._root = _Signer(cert, key)
        self.ca_pem = _cert_pem(cert)

    @classmethod
    def load(cls, data_dir: Path) -> RootAuthority:
        pki = data_dir / PKI_DIR
        key_path = pki / CA_KEY_FILE
        if not key_path.exists():
            raise KillswitchError(
                f"no root CA key at {key_path}: operator identities are issued where the"
                " root key is kept (the data dir `killswitch init` made), not on a replica"
            )
        cert = load_certificate(pki / CA_CERT_FILE)
        return cls(cert, load_key(key_path))

    def issue(
        self,
        csr_pem: bytes | str,
        role: Role,
        *,
        now: float,
        days: int = OPERATOR_DAYS,
        server_names: Sequence[str] = (),
    ) -> tuple[bytes, CertificateRecord]:
        """A certificate for the CSR's named person in ``role``, which the CSR must have
        asked for; with ``server_names`` it may also serve TLS under them (the ingest
        gateway does). Agents are not issued here: they enrol."""
        if role is Role.AGENT:
            raise InvalidInput("agents are not issued by hand: they enrol with a join token")
        if server_names and role is not Role.INGEST:
            raise InvalidInput("server names are for the ingest gateway's certificate only")
        if role is Role.INGEST:  # it serves agents TLS under the server's names too
            server_names = [*SERVER_DEFAULT_NAMES, *server_names]
        csr, public_key = _parse_csr(csr_pem)
        name = validate_identity_name(_single_attribute(csr.subject, NameOID.COMMON_NAME))
        asked = _single_attribute(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        if asked != role.value:
            raise InvalidInput(
                f"the request of {name} asks for role {asked or 'none'!r}, not {role.value!r}:"
                f" issue the role it asks for, or have {name} make a new request"
            )
        return _client_certificate(
            public_key,
            name,
            role,
            self._root,
            now=now,
            days=days,
            server_names=[_server_name(n) for n in server_names],
        )


# ------------------------------------------------------------------ a replica's authority


class Authority:
    """What a replica holds: the root certificate to trust, the agent CA to sign
    enrolments with, and its server certificate. ``load`` reads them from ``DATA/pki``."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        agent_ca: x509.Certificate,
        agent_ca_key: ec.EllipticCurvePrivateKey,
        server_cert_pem: bytes,
        server_key_pem: bytes,
    ) -> None:
        self._root_cert = ca_cert
        self._agent_ca = _Signer(agent_ca, agent_ca_key)
        self.ca_pem = _cert_pem(ca_cert)
        self.agent_ca_pem = _cert_pem(agent_ca)
        self.server_cert_pem = server_cert_pem
        self.server_key_pem = server_key_pem

    @classmethod
    def load(cls, data_dir: Path) -> Authority:
        pki = data_dir / PKI_DIR
        if not (pki / CA_CERT_FILE).exists():
            raise KillswitchError(
                f"no CA in {pki}: run `killswitch init --data-dir {data_dir}` first"
            )
        if not (pki / AGENT_CA_CERT_FILE).exists():
            raise KillswitchError(
                f"no agent CA ({AGENT_CA_CERT_FILE}) in {pki}: this data dir was made by an"
                " older `killswitch init`, whose CA key signed everything on the server."
                " Run `killswitch init` in a new data dir, issue people their identities"
                " and let agents enrol again (README: PKI layout)"
            )
        return cls(
            load_certificate(pki / CA_CERT_FILE),
            load_certificate(pki / AGENT_CA_CERT_FILE),
            load_key(pki / AGENT_CA_KEY_FILE),
            read_file(pki / SERVER_CERT_FILE),
            read_file(pki / SERVER_KEY_FILE),
        )

    def sign_agent_csr(
        self, csr_pem: bytes | str, agent_id: str, *, now: float
    ) -> tuple[bytes, CertificateRecord]:
        """A certificate for ``agent_id`` on the CSR's key; nothing else of the CSR is used.

        The PEM is the leaf followed by the agent CA: the chain an agent presents."""
        validate_agent_id(agent_id)
        if len(agent_id) > MAX_NAME_LENGTH:
            raise InvalidInput(
                f"agent id {agent_id!r} is too long for a certificate:"
                f" at most {MAX_NAME_LENGTH} characters"
            )
        _, public_key = _parse_csr(csr_pem)
        cert_pem, record = _client_certificate(
            public_key, agent_id, Role.AGENT, self._agent_ca, now=now, days=AGENT_DAYS
        )
        return cert_pem + self.agent_ca_pem, record

    def principal_from_pem(self, cert_pem: bytes) -> Principal:
        """The principal a verified peer certificate names, if its issuer may issue that
        role: the agent CA issues agents only, every other role comes from the root."""
        principal = principal_from_pem(cert_pem)
        if principal.role is not Role.AGENT and not _signed_by(cert_pem, self.ca_pem):
            raise PermissionDenied(
                f"a {principal.role.value} certificate must be signed by the root CA,"
                f" not by the agent CA (serial {principal.serial})"
            )
        return principal


@functools.lru_cache(maxsize=PRINCIPAL_CACHE_SIZE)
def _signed_by(cert_pem: bytes, issuer_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(issuer_pem)
        )
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _parse_csr(csr_pem: bytes | str) -> tuple[x509.CertificateSigningRequest, LeafPublicKey]:
    """A CSR whose signature verifies, on a key we accept; one line for anything else."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise InvalidInput(f"CSR too large: {len(data)} bytes, at most {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(data)
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
        raise InvalidInput("malformed CSR: expected one PEM certificate request") from None
    if not _acceptable_key(public_key):
        raise InvalidInput(f"CSR key refused: use EC P-256 or RSA of at least {MIN_RSA_BITS} bits")
    if not signed:
        raise InvalidInput("CSR signature does not verify")
    return csr, public_key


def _subject(name: str, role: Role) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        ]
    )


def _client_certificate(
    public_key: LeafPublicKey,
    name: str,
    role: Role,
    issuer: _Signer,
    *,
    now: float,
    days: int,
    server_names: Sequence[x509.GeneralName] = (),
) -> tuple[bytes, CertificateRecord]:
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = _validity(x509.CertificateBuilder(), _utc(now), days).subject_name(
        _subject(name, role)
    )
    if server_names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names = list(dict.fromkeys(server_names))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = _sign_leaf(builder, public_key, issuer)
    record = CertificateRecord(
        serial=_serial_hex(cert),
        subject=name,
        role=role,
        not_after=cert.not_valid_after_utc.timestamp(),
        issued_at=now,
    )
    return _cert_pem(cert), record


def _sign_leaf(
    builder: x509.CertificateBuilder, public_key: LeafPublicKey, issuer: _Signer
) -> x509.Certificate:
    """Finish a leaf certificate with what every leaf shares: issuer, serial, key usage."""
    return (
        builder.public_key(public_key)
        .issuer_name(issuer.cert.subject)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
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
    name = _single_attribute(cert.subject, NameOID.COMMON_NAME)
    if not name:
        raise PermissionDenied("certificate has no name (CN)")
    unit = _single_attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not unit:
        raise PermissionDenied("certificate has no role (OU)")
    try:
        role = Role(unit)
    except ValueError:
        raise PermissionDenied(f"certificate role {unit!r} is not a known role") from None
    return Principal(name=name, role=role, serial=_serial_hex(cert))


def _single_attribute(subject: x509.Name, oid: x509.ObjectIdentifier) -> str:
    """The subject's one value for ``oid``; '' when absent or ambiguous (given twice)."""
    values = subject.get_attributes_for_oid(oid)
    return values[0].value if len(values) == 1 and isinstance(values[0].value, str) else ""


# ------------------------------------------------------------------ identity files


def load_identity(directory: Path) -> Identity:
    if (directory / CSR_FILE).exists() and not (directory / CERT_FILE).exists():
        raise KillswitchError(
            f"{directory} holds a request but no certificate yet: an administrator signs"
            f" {directory / CSR_FILE} (`killswitch certs issue`); save the result as"
            f" {directory / CERT_FILE} and the CA's ca.pem beside it"
        )
    return Identity(
        cert_pem=read_file(directory / CERT_FILE),
        key_pem=read_file(directory / KEY_FILE),
        ca_pem=read_file(directory / CA_CERT_FILE),
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
