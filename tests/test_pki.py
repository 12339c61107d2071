"""The CA with real certificates, checked by real TLS: who gets in, and as whom."""

from __future__ import annotations

import asyncio
import base64
import datetime
import re
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import PermissionDenied
from control.pki import MAX_CSR_BYTES
from control.pki import REPLICA_FILES
from control.pki import Authority
from control.pki import Identity
from control.pki import RootAuthority
from control.pki import initialise
from control.pki import load_identity
from control.pki import principal_from_pem
from control.pki import request_identity

NOW = time.time()
DAY = 86_400.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("pki") / "data"
    initialise(data, server_names=["killswitch.example", "10.0.0.5"], now=NOW)
    return data


@pytest.fixture(scope="module")
def authority(data_dir: Path) -> Authority:
    return Authority.load(data_dir)


def csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    subject: x509.Name | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- set-up


def test_initialise_writes_everything_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    record = initialise(data, now=NOW)
    assert (record.subject, record.role) == ("admin", Role.ADMIN)
    files = [p for p in data.rglob("*") if p.is_file()]
    dirs = [p for p in data.rglob("*") if p.is_dir()]
    assert {p.relative_to(data).as_posix() for p in files} == {
        "pki/ca.pem",
        "pki/ca-key.pem",
        "pki/agent-ca.pem",
        "pki/agent-ca-key.pem",
        "pki/server.pem",
        "pki/server-key.pem",
    } | {f"identities/admin/{f}" for f in ("cert.pem", "key.pem", "ca.pem", "request.csr")}
    assert all(mode(p) == 0o600 for p in files), {str(p): oct(mode(p)) for p in files}
    assert all(mode(p) == 0o700 for p in [data, *dirs]), {str(p): oct(mode(p)) for p in dirs}
    assert "ca-key.pem" not in REPLICA_FILES


def test_a_replica_loads_without_the_root_key(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for name in REPLICA_FILES:
        (tmp_path / "pki" / name).write_bytes((data_dir / "pki" / name).read_bytes())
    replica = Authority.load(tmp_path)
    cert_pem, _ = replica.sign_agent_csr(csr(p256()), "laptop-1", now=NOW)
    assert principal_from_pem(cert_pem).role is Role.AGENT
    with pytest.raises(KillswitchError, match=r"no root CA key at .*not on a replica"):
        RootAuthority.load(tmp_path)


def test_an_old_data_dir_without_an_agent_ca_is_one_clear_error(tmp_path: Path) -> None:
    initialise(tmp_path, now=NOW)
    (tmp_path / "pki" / "agent-ca.pem").unlink()
    with pytest.raises(KillswitchError, match=r"no agent CA \(agent-ca\.pem\) in .*older"):
        Authority.load(tmp_path)


def test_initialise_refuses_to_run_twice(data_dir: Path) -> None:
    with pytest.raises(Conflict, match=r"already initialised: .*pki/ca\.pem exists"):
        initialise(data_dir, now=NOW)


def test_initialise_leaves_an_existing_data_dir_mode_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    initialise(tmp_path, now=NOW)
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "pki") == 0o700


def test_bad_server_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="bad server name 'not a host'"):
        initialise(tmp_path / "data", server_names=["not a host"], now=NOW)
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file, not a directory")
    with pytest.raises(KillswitchError) as caught:
        initialise(tmp_path / "data", now=NOW)
    assert str(caught.value) == f"cannot create directory {tmp_path}/data: File exists"


def test_load_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KillswitchError) as caught:
        Authority.load(tmp_path)
    assert str(caught.value) == (
        f"no CA in {tmp_path}/pki: run `killswitch init --data-dir {tmp_path}` first"
    )


def test_load_identity_names_the_missing_file(data_dir: Path, tmp_path: Path) -> None:
    identity = load_identity(data_dir / "identities" / "admin")
    (tmp_path / "cert.pem").write_bytes(identity.cert_pem)
    with pytest.raises(KillswitchError, match=f"missing {tmp_path}/key.pem"):
        load_identity(tmp_path)


def test_certificates_have_the_agreed_shape(data_dir: Path, authority: Authority) -> None:
    ca = x509.load_pem_x509_certificate(authority.ca_pem)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 1
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == "sha256"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=3650)

    agent_ca = x509.load_pem_x509_certificate(authority.agent_ca_pem)
    constraints = agent_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    agent_ca.verify_directly_issued_by(ca)

    server = x509.load_pem_x509_certificate(authority.server_cert_pem)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "killswitch.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.0.0.5",
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    admin = x509.load_pem_x509_certificate(load_identity(data_dir / "identities/admin").cert_pem)
    admin.verify_directly_issued_by(ca)
    eku = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert admin.not_valid_before_utc.timestamp() == pytest.approx(NOW - 60, abs=1)
    assert admin.not_valid_after_utc.timestamp() == pytest.approx(NOW + 365 * DAY, abs=1)


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.AGENT])
def test_a_persons_request_signed_by_the_root_names_them(
    data_dir: Path, tmp_path: Path, role: Role
) -> None:
    csr_pem = request_identity(tmp_path / "alice", "alice", role)
    assert mode(tmp_path / "alice" / "key.pem") == 0o600
    cert_pem, record = RootAuthority.load(data_dir).issue(csr_pem, role, now=NOW)
    principal = principal_from_pem(cert_pem)
    assert principal == Principal(name="alice", role=role, serial=record.serial)
    key = serialization.load_pem_private_key(
        (tmp_path / "alice" / "key.pem").read_bytes(), password=None
    )
    assert x509.load_pem_x509_certificate(cert_pem).public_key() == key.public_key()
    assert Authority.load(data_dir).principal_from_pem(cert_pem) == principal


def test_the_root_grants_only_the_role_the_request_asks_for(data_dir: Path, tmp_path: Path) -> None:
    root = RootAuthority.load(data_dir)
    employee = request_identity(tmp_path / "bob", "bob", Role.EMPLOYEE)
    with pytest.raises(InvalidInput, match="the request of bob asks for role 'employee'"):
        root.issue(employee, Role.INCIDENT_COMMANDER, now=NOW)
    with pytest.raises(InvalidInput, match="agents are not issued by hand"):
        root.issue(employee, Role.AGENT, now=NOW)
    with pytest.raises(InvalidInput, match="server names are for the ingest gateway"):
        root.issue(employee, Role.EMPLOYEE, now=NOW, server_names=["x.example"])
    with pytest.raises(Conflict, match=r"key\.pem exists"):
        request_identity(tmp_path / "bob", "bob", Role.EMPLOYEE)


def test_an_operator_role_signed_by_the_agent_ca_is_no_principal(
    data_dir: Path, authority: Authority
) -> None:
    """What a thief of a replica's agent CA key could mint: refused, whatever it says."""
    agent_ca_key = serialization.load_pem_private_key(
        (data_dir / "pki" / "agent-ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(agent_ca_key, ec.EllipticCurvePrivateKey)
    forged = forge(name(cn="mallory", ou="incident-commander"), authority, agent_ca_key)
    with pytest.raises(PermissionDenied, match="must be signed by the root CA"):
        authority.principal_from_pem(forged)
    agent = forge(name(cn="laptop-9", ou="agent"), authority, agent_ca_key)
    assert authority.principal_from_pem(agent).role is Role.AGENT


def forge(
    subject: x509.Name, authority: Authority, agent_ca_key: ec.EllipticCurvePrivateKey
) -> bytes:
    issuer = x509.load_pem_x509_certificate(authority.agent_ca_pem).subject
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(p256().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.now(datetime.UTC))
        .not_valid_after(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
        .sign(agent_ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def self_signed(subject: x509.Name) -> bytes:
    key = p256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime.now(datetime.UTC))
        .not_valid_after(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def name(**attributes: str) -> x509.Name:
    oids = {"cn": NameOID.COMMON_NAME, "ou": NameOID.ORGANIZATIONAL_UNIT_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attributes.items()])


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        (name(ou="sre"), "certificate has no name (CN)"),
        (name(cn="mallory"), "certificate has no role (OU)"),
        (name(cn="mallory", ou="root"), "certificate role 'root' is not a known role"),
    ],
)
def test_a_certificate_without_name_or_role_is_no_principal(
    subject: x509.Name, message: str
) -> None:
    with pytest.raises(PermissionDenied, match=re.escape(message)):
        principal_from_pem(self_signed(subject))


# ---------------------------------------------------------------- agent CSRs


def test_agent_csr_is_signed_for_the_agent_id(authority: Authority) -> None:
    key = p256()
    cert_pem, record = authority.sign_agent_csr(csr(key).decode(), "laptop-00042", now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key() == key.public_key()
    assert principal_from_pem(cert_pem) == Principal("laptop-00042", Role.AGENT, record.serial)
    assert (record.subject, record.role, record.issued_at) == ("laptop-00042", Role.AGENT, NOW)
    assert record.not_after == pytest.approx(NOW + 90 * DAY, abs=1)
    leaf, agent_ca = x509.load_pem_x509_certificates(cert_pem)
    leaf.verify_directly_issued_by(agent_ca)
    agent_ca.verify_directly_issued_by(x509.load_pem_x509_certificate(authority.ca_pem))


def test_an_rsa_2048_csr_is_accepted(authority: Authority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_pem, _ = authority.sign_agent_csr(csr(key), "laptop-rsa", now=NOW)
    assert x509.load_pem_x509_certificate(cert_pem).public_key() == key.public_key()


def test_a_csr_asking_for_more_gets_only_the_agent_identity(authority: Authority) -> None:
    greedy = csr(
        p256(),
        subject=name(cn="ic-1", ou="incident-commander"),
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectAlternativeName([x509.DNSName("control.example")]),
        ],
    )
    cert_pem, _ = authority.sign_agent_csr(greedy, "laptop-7", now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject == name(cn="laptop-7", ou="agent")
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def tampered(pem: bytes) -> bytes:
    """The same request with its signature's last byte flipped: parses, does not verify."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def unknown_version(pem: bytes) -> bytes:
    """The same request claiming version 2 (found by bench/fuzz_campaign.py: the
    library's InvalidVersion, not a ValueError, came out as gRPC's UNKNOWN)."""
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    version_zero = b"\x02\x01\x00"  # INTEGER 0, the info's first field
    assert version_zero in der
    patched = der.replace(version_zero, b"\x02\x01\x01", 1)
    return b"".join(
        [
            b"-----BEGIN CERTIFICATE REQUEST-----\n",
            base64.encodebytes(patched),
            b"-----END CERTIFICATE REQUEST-----\n",
        ]
    )


@pytest.mark.parametrize(
    ("make_csr", "agent_id", "message"),
    [
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", "a", "malformed CSR"),
        (lambda: unknown_version(csr(p256())), "a", "malformed CSR"),
        (lambda: "not pem at all", "a", "malformed CSR"),
        (lambda: b"x" * (MAX_CSR_BYTES + 1), "a", "CSR too large"),
        (lambda: tampered(csr(p256())), "a", "CSR signature does not verify"),
        (lambda: csr(ec.generate_private_key(ec.SECP384R1())), "a", "CSR key refused"),
        (
            lambda: csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "a",
            "CSR key refused",
        ),
        (lambda: csr(p256()), "bad id!", "invalid agent id"),
        (lambda: csr(p256()), "a" * 65, "too long for a certificate"),
    ],
)
def test_bad_csrs_are_refused_with_one_line(
    authority: Authority, make_csr: object, agent_id: str, message: str
) -> None:
    assert callable(make_csr)
    with pytest.raises(InvalidInput, match=message) as caught:
        authority.sign_agent_csr(make_csr(), agent_id, now=NOW)
    assert "\n" not in str(caught.value)


def test_operator_names_must_be_safe_directory_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"invalid identity name '\.\./etc'"):
        request_identity(tmp_path / "x", "../etc", Role.SRE)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- real TLS

PROBE = "/killswitch.test.Probe/WhoAmI"


@asynccontextmanager
async def mtls_server(authority: Authority) -> AsyncIterator[tuple[str, list[Principal]]]:
    """A server that requires client certificates and records who each caller was."""
    seen: list[Principal] = []

    async def who_am_i(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        principal = principal_from_pem(next(iter(context.auth_context()["x509_pem_cert"])))
        seen.append(principal)
        return principal.describe().encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "killswitch.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(authority.server_key_pem, authority.server_cert_pem)],
        root_certificates=authority.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        await server.stop(grace=None)


async def call(target: str, credentials: grpc.ChannelCredentials) -> bytes:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        probe = channel.unary_unary(PROBE, request_serializer=None, response_deserializer=None)
        answer: bytes = await probe(b"", timeout=5)
        return answer


def client(identity: Identity, ca_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem
    )


def test_mtls_admits_only_current_certificates_of_this_ca(
    data_dir: Path, authority: Authority, tmp_path: Path
) -> None:
    admin = load_identity(data_dir / "identities" / "admin")
    initialise(tmp_path / "other", now=NOW)
    stranger = load_identity(tmp_path / "other" / "identities" / "admin")
    csr_pem = request_identity(tmp_path / "sre-old", "sre-old", Role.SRE)
    cert, _ = RootAuthority.load(data_dir).issue(csr_pem, Role.SRE, now=NOW - 3 * DAY, days=1)
    expired = Identity(cert, (tmp_path / "sre-old" / "key.pem").read_bytes(), authority.ca_pem)
    ca = authority.ca_pem

    async def scenario() -> None:
        async with mtls_server(authority) as (target, seen):
            assert await call(target, client(admin, ca)) == b"admin (admin)"
            assert [p.name for p in seen] == ["admin"]
            refused = {
                "a certificate from another CA": client(stranger, ca),
                "no certificate": grpc.ssl_channel_credentials(root_certificates=ca),
                "an expired certificate": client(expired, ca),
            }
            for what, credentials in refused.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(target, credentials)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, what
            assert [p.name for p in seen] == ["admin"], "no refused caller reached the handler"

    asyncio.run(scenario())
