"""TLS for the bare baseline: its certificates, made once per run, and what reads them.

The pause benchmark's mtls comparison measures the product over mTLS against the bare
grpc.aio push over TLS with client certificates, so the ratio shows what the product
adds on top of what TLS itself costs. For the handshakes to cost the same, the files
come from the product's own PKI code and lie where the product keeps its own:
``DIR/pki`` as ``killswitch init`` writes it (root CA, agent CA, a server certificate
for 127.0.0.1, EC P-256 keys), and each agent's key and certificate chain (leaf, then
the agent CA) in ``DIR/agents/<agent id>/``, as an enrolled agent keeps them. The
harness's people get theirs as the product's do: their own key, signed by the root.

Each agent has a certificate of its own, issued here instead of over an enrolment
port (the baseline does not enrol): about 11 s for 10,000 agents on the 2-core box.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from agent_stub.identity import CERT_FILE
from agent_stub.identity import KEY_FILE
from agent_stub.identity import AgentIdentity
from agent_stub.identity import agent_state_dir
from agent_stub.identity import new_key_and_csr
from control import pki
from control.domain.identity import Role

AGENTS_DIR = "agents"


def make_certificates(
    tls_dir: Path, agent_ids: Sequence[str], people: Mapping[str, Role], people_dir: Path
) -> None:
    """A CA and server certificate in ``tls_dir``, a certificate for each of ``agent_ids``,
    and each of ``people`` an identity in ``people_dir/<name>`` (what ``Operator`` loads)."""
    now = time.time()
    pki.initialise(tls_dir, now=now)
    root = pki.RootAuthority.load(tls_dir)
    for name, role in people.items():
        directory = people_dir / name
        cert_pem, _ = root.issue(pki.request_identity(directory, name, role), role, now=now)
        (directory / pki.CERT_FILE).write_bytes(cert_pem)
        (directory / pki.CA_CERT_FILE).write_bytes(root.ca_pem)
    authority = pki.Authority.load(tls_dir)
    for name in agent_ids:
        key, csr_pem = new_key_and_csr()
        chain_pem, _ = authority.sign_agent_csr(csr_pem, name, now=now)
        # Not fsynced: a scratch directory, read once by a fleet started seconds later.
        directory = agent_state_dir(tls_dir / AGENTS_DIR, name)
        directory.mkdir(parents=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (directory / KEY_FILE).write_bytes(key_pem)
        (directory / CERT_FILE).write_bytes(chain_pem)


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """The product server's own: its certificate, and client certificates required."""
    files = tls_dir / pki.PKI_DIR
    return grpc.ssl_server_credentials(
        [(_read(files / pki.SERVER_KEY_FILE), _read(files / pki.SERVER_CERT_FILE))],
        root_certificates=_read(files / pki.CA_CERT_FILE),
        require_client_auth=True,
    )


def agent_credentials(tls_dir: Path, agent_ids: Sequence[str]) -> list[grpc.ChannelCredentials]:
    """Each agent's, as the product agent makes them from its stored identity. Read, not
    verified: the product's agents check theirs while enrolling, and its connect figure
    starts once they have."""
    ca_pem = _read(tls_dir / pki.PKI_DIR / pki.CA_CERT_FILE)
    credentials = []
    for name in agent_ids:
        directory = agent_state_dir(tls_dir / AGENTS_DIR, name)
        identity = AgentIdentity(_read(directory / CERT_FILE), _read(directory / KEY_FILE), ca_pem)
        credentials.append(identity.credentials())
    return credentials


def _read(path: Path) -> bytes:
    """A file of ``--tls DIR``, or one line saying which is missing."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}; --tls DIR is made by"
                         " bench.bare_tls.make_certificates") from None  # fmt: skip
