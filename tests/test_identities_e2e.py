"""Real people, real keys (issue 15, finding 7), against a real mTLS server.

Each person makes their own key; an administrator signs their request with the root
key, offline; replicas hold only the agent CA, which can sign laptops and nothing else.
"""

from __future__ import annotations

import datetime
import shutil
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.pki import REPLICA_FILES
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import replica_of
from tests.conftest import wait_capturing


def killswitch(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [str(BIN / "killswitch"), *args], capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout, done.stderr


def files_holding(root: Path, data: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def test_a_person_makes_their_key_and_the_admin_signs_their_request(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    alice = tmp_path / "alice-laptop"
    code, csr, err = killswitch(
        "identity", "request", "--name", "alice", "--role", "incident-commander",
        "--out", str(alice),
    )  # fmt: skip
    assert code == 0, err
    assert csr.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    key = (alice / "key.pem").read_bytes()
    assert stat.S_IMODE((alice / "key.pem").stat().st_mode) == 0o600

    # The administrator grants only the role asked for, then signs with the root key.
    csr_file = str(alice / "request.csr")
    root = ["--data-dir", str(server.root_dir)]
    code, _, err = killswitch("certs", "issue", csr_file, "--role", "approver", *root)
    assert code == 2 and "asks for role 'incident-commander'" in err and "\n" not in err.strip()
    code, cert, err = killswitch("certs", "issue", csr_file, "--role", "incident-commander", *root)
    assert code == 0, err
    (alice / "cert.pem").write_text(cert)
    shutil.copy(server.root_dir / "pki" / "ca.pem", alice / "ca.pem")

    hold = cli.ok("pause", "--all", "--reason", "her own key", "--identity", str(alice)).split()[1]
    assert [(h["id"], h["created_by"]) for h in cli.json("holds")["holds"]] == [(hold, "alice")]
    certs = {c["subject"]: c for c in cli.as_("admin").json("certs", "list")}
    assert certs["alice"]["role"] == "incident-commander"
    # Her key was never anywhere near the server.
    assert files_holding(server.data_dir, key) == []


def test_an_operator_certificate_from_the_agent_ca_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A stolen replica key mints laptops, never incident commanders."""
    pki = server.data_dir / "pki"
    agent_ca = x509.load_pem_x509_certificate((pki / "agent-ca.pem").read_bytes())
    agent_ca_key = serialization.load_pem_private_key(
        (pki / "agent-ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(agent_ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "incident-commander"),
                ]
            )
        )
        .issuer_name(agent_ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(agent_ca_key, hashes.SHA256())
    )
    chain = forged.public_bytes(serialization.Encoding.PEM) + (pki / "agent-ca.pem").read_bytes()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key_pem, chain)
    with (
        grpc.secure_channel(server.address, credentials) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        channel.unary_unary("/killswitch.v1.Operator/CreateHold", None, None)(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "must be signed by the root CA" in (info.value.details() or "")
    assert Cli(server).json("holds")["holds"] == []


def test_the_admin_issues_and_revokes_but_cannot_pause_or_approve(
    server: ServerProcess, cli: Cli
) -> None:
    admin = cli.as_("admin")
    denied = admin.run("pause", "--all", "--reason", "admin trying")
    assert denied.returncode == 1 and "role admin may not call Operator.CreateHold" in denied.stderr
    hold = cli.pause("--all", "--reason", "leak")
    request_id = cli.ok("resume", "--hold", hold, "--reason", "contained").split()[2]
    # `approve` reads the request first, and the admin may not even do that; the role
    # matrix (test_security_e2e) checks ApproveResume itself.
    denied = admin.run("approve", request_id)
    assert denied.returncode == 1 and "role admin may not call" in denied.stderr
    assert cli.json("holds")["holds"], "still paused"

    # Per person, not a shared employee-1: revoking Bob leaves Carol alone.
    bob, carol = cli.as_("employee-bob"), cli.as_("employee-carol")
    assert bob.ok("me") and carol.ok("me")
    assert admin.ok("enroll-token", "create", "--uses", "1", "--ttl", "60").startswith("kst_")
    out = admin.ok("certs", "revoke", "employee-bob", "--reason", "left the company")
    assert "1 certificates revoked" in out
    refused = bob.run("me")
    assert refused.returncode == 1 and "has been revoked" in refused.stderr
    assert carol.ok("me")


def test_a_replica_without_the_root_key_serves_and_enrols_agents(
    start_server: StartServer, simulate: Simulate, pg_dsn: str, tmp_path: Path
) -> None:
    first = start_server("--database", pg_dsn)
    replica = replica_of(first, tmp_path / "replica", ["--database", pg_dsn])
    root_key = (first.data_dir / "pki" / "ca-key.pem").read_bytes()
    assert files_holding(replica.data_dir, root_key) == []
    assert sorted(p.name for p in (replica.data_dir / "pki").iterdir()) == sorted(REPLICA_FILES)
    replica.start()
    try:
        simulate(replica, 3, "--id-prefix", "via-replica")
        as_ic = Cli(replica)
        wait_capturing(as_ic, 3)
        assert files_holding(replica.data_dir, root_key) == []
        # A replica cannot make people: there is no root key to sign with.
        csr = first.people / "ic-1" / "request.csr"
        code, _, err = killswitch(
            "certs", "issue", str(csr), "--role", "incident-commander",
            "--data-dir", str(replica.data_dir), "--database", pg_dsn,
        )  # fmt: skip
        assert code == 1 and "no root CA key" in err
    finally:
        replica.stop()


def test_serve_refuses_a_data_dir_from_the_old_init_in_one_line(tmp_path: Path) -> None:
    """An old data dir has one CA whose key signed everything, and no agent CA."""
    data = tmp_path / "old"
    code, _, err = killswitch("init", "--data-dir", str(data))
    assert code == 0, err
    for name in ("agent-ca.pem", "agent-ca-key.pem"):
        (data / "pki" / name).unlink()
    code, _, err = killswitch("serve", "--data-dir", str(data), "--grpc", "127.0.0.1:0")
    assert code == 1
    assert err.startswith("killswitch: error: no agent CA (agent-ca.pem) in ")
    assert "older `killswitch init`" in err and err.count("\n") == 1
