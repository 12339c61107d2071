"""Signing a proof report with the server's key, and checking it offline.

What is signed is a manifest, not the report's text: a SHA-256 digest of each top-level
section and one per laptop row, each over canonical JSON (sorted keys, no spaces), so
the file may be re-indented freely while any changed value is caught, and a verifier
can say *which* laptop row or section changed rather than only "the file changed".
Audit entries are checked a second way, by their own chain hashes, so an altered entry
is named by its seq; the server's audit checkpoint inside is checked as
``audit verify --checkpoints`` would.

The signer is the server (its TLS key, the one audit checkpoints use): no new key to
create, distribute or rotate, and the verifier needs only the fleet's CA. The cost is
that the server key now signs three things (TLS, checkpoints, reports); whoever holds
it can forge a report, exactly as they can forge a checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import fields
from typing import Any

from cryptography import x509

from control import audit_checkpoints
from control import server_signature
from control.domain.audit import AuditRecord
from control.domain.audit import entry_hash
from control.errors import InvalidInput
from control.errors import shown
from control.report.build import KIND

DOCUMENT_KIND = "killswitch-signed-proof-report/1"
_AUDIT_FIELDS = tuple(f.name for f in fields(AuditRecord))


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()


def manifest(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": KIND,
        "sections": {name: digest(part) for name, part in report.items() if name != "laptops"},
        "laptops": [[row["agent_id"], digest(row)] for row in report["laptops"]],
    }


def sign_report(report: Mapping[str, Any], key_pem: bytes, cert_pem: bytes) -> dict[str, Any]:
    signed = manifest(report)
    return {
        "kind": DOCUMENT_KIND,
        "report": dict(report),
        "manifest": signed,
        "signer": cert_pem.decode(),
        "signature": server_signature.sign(canonical(signed), key_pem, "proof reports"),
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``report verify`` found: problems (empty when intact) and what was checked."""

    problems: list[str]
    summary: str


def verify(document: Any, ca_pem: bytes) -> Verdict:
    try:
        report, signed = document["report"], document["manifest"]
        signer = x509.load_pem_x509_certificate(document["signer"].encode())
        signature = base64.b64decode(document["signature"], validate=True)
        at = float(report["generated_at_seconds"])
        if document["kind"] != DOCUMENT_KIND or not isinstance(report["laptops"], list):
            raise TypeError
    except (KeyError, TypeError, ValueError, AttributeError):
        return Verdict(["unreadable: not a killswitch signed proof report"], "")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise InvalidInput("the CA given is not a PEM certificate") from None
    why = server_signature.problem(signer, signature, canonical(signed), at, ca)
    if why is not None:
        return Verdict([f"the signature: {why}"], "")
    problems = [*_section_problems(report, signed), *_row_problems(report["laptops"], signed)]
    problems += _audit_problems(report.get("audit"), ca)
    hold = report["hold"].get("id", "?") if isinstance(report.get("hold"), dict) else "?"
    summary = (
        f"report intact: hold {hold}, {len(report['laptops'])} laptops, signed by the server"
        f" (certificate serial {signer.serial_number:x}) at {report.get('generated_at')}"
    )
    return Verdict(problems, summary)


def _section_problems(report: Mapping[str, Any], signed: Mapping[str, Any]) -> list[str]:
    sections: Mapping[str, str] = signed["sections"]
    found = [name for name in report if name != "laptops"]
    problems = [
        f"section {shown(name)} was altered"
        for name in found
        if name in sections and digest(report[name]) != sections[name]
    ]
    problems += [f"section {shown(name)} was added" for name in found if name not in sections]
    problems += [f"section {shown(name)} was removed" for name in sections if name not in report]
    return problems


def _row_problems(rows: list[Any], signed: Mapping[str, Any]) -> list[str]:
    """Rows are matched by agent id, so one removed row names that laptop, not every
    row after it; an edited agent id reads as its laptop removed and another added."""
    expected: dict[str, str] = dict(signed["laptops"])
    seen: set[str] = set()
    problems = []
    for row in rows:
        agent_id = row.get("agent_id") if isinstance(row, dict) else None
        if not isinstance(agent_id, str) or agent_id not in expected:
            problems.append(f"laptop row {shown(agent_id)} was added")
        elif agent_id in seen:
            problems.append(f"laptop row {agent_id} appears twice")
        elif digest(row) != expected[agent_id]:
            problems.append(f"laptop row {agent_id} was altered")
        if isinstance(agent_id, str):
            seen.add(agent_id)
    problems += [f"laptop row {a} was removed" for a in expected if a not in seen]
    return problems


def _chained(entry: Any) -> tuple[str, tuple[int, str] | None]:
    """An excerpt entry's seq as shown, and (seq, hash) if that hash is still the hash
    of its contents."""
    if not isinstance(entry, dict):
        return "?", None
    label = shown(entry.get("seq", "?"))
    try:
        record = AuditRecord(**{name: entry[name] for name in _AUDIT_FIELDS})
        seq, claimed = int(entry["seq"]), str(entry["hash"])
        intact = entry_hash(seq, record, str(entry["prev_hash"])) == claimed
    except (KeyError, TypeError, ValueError):
        return label, None
    return label, (seq, claimed) if intact else None


def _audit_problems(audit: Any, ca: x509.Certificate) -> list[str]:
    """Each excerpt entry against its own chain hash; the checkpoint against the CA."""
    if not isinstance(audit, dict):
        return []  # a missing or mangled section is already named by its digest
    problems = []
    hashes: dict[int, str] = {}
    for entry in audit.get("entries", []):
        label, intact = _chained(entry)
        if intact is None:
            problems.append(f"audit entry {label} was altered (its chain hash does not match)")
        else:
            hashes[intact[0]] = intact[1]
    line = audit.get("checkpoint")
    if line is None:
        return problems
    try:
        checkpoint = audit_checkpoints.checked("in the report", json.loads(line), ca)
    except (TypeError, ValueError):
        checkpoint = "checkpoint in the report: unreadable"
    if isinstance(checkpoint, str):
        problems.append(checkpoint)
    elif checkpoint.seq in hashes and hashes[checkpoint.seq] != checkpoint.hash:
        problems.append(f"audit entry {checkpoint.seq} contradicts the signed checkpoint")
    return problems
