"""`report verify` offline: whatever the file holds, a verdict naming the problem, never a
traceback; and only the fleet's server may sign a report."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control.errors import InvalidInput
from control.pki import Authority
from control.pki import initialise
from control.pki import load_identity
from control.report.signing import sign_report
from control.report.signing import verify


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Path]:
    data_dir = tmp_path_factory.mktemp("pki")
    initialise(data_dir, now=time.time())
    return Authority.load(data_dir), data_dir


def a_report() -> dict[str, Any]:
    return {
        "kind": "killswitch-proof-report/1",
        "generated_at_seconds": time.time(),
        "hold": {"id": "hold-1", "reason": "leak"},
        "laptops": [{"agent_id": f"laptop-{i}", "uploads_refused": 0} for i in range(3)],
        "audit": {"entries": [], "head": {"seq": 0, "hash": ""}, "checkpoint": None},
    }


def signed(authority: Authority) -> dict[str, Any]:
    return sign_report(a_report(), authority.server_key_pem, authority.server_cert_pem)


def test_an_intact_report_verifies(authority: tuple[Authority, Path]) -> None:
    verdict = verify(signed(authority[0]), authority[0].ca_pem)
    assert verdict.problems == [] and "hold hold-1, 3 laptops" in verdict.summary


MANGLINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "report a list": lambda d: d.update(report=[]),
    "laptops not a list": lambda d: d["report"].update(laptops="x"),
    "a row not an object": lambda d: d["report"]["laptops"].__setitem__(0, 7),
    "a row without an id": lambda d: d["report"]["laptops"][0].pop("agent_id"),
    "hold a string": lambda d: d["report"].update(hold="x"),
    "audit entries garbage": lambda d: d["report"]["audit"].update(entries=[1, {"seq": "x"}]),
    "checkpoint garbage": lambda d: d["report"]["audit"].update(checkpoint="{not json"),
    "signature not base64": lambda d: d.update(signature="***"),
    "signer not a certificate": lambda d: d.update(signer="-----BEGIN CERTIFICATE-----"),
    "no manifest": lambda d: d.pop("manifest"),
}


@pytest.mark.parametrize("mangle", MANGLINGS.values(), ids=MANGLINGS.keys())
def test_a_mangled_report_is_refused_with_a_reason(
    authority: tuple[Authority, Path], mangle: Callable[[dict[str, Any]], None]
) -> None:
    document = copy.deepcopy(signed(authority[0]))
    mangle(document)
    verdict = verify(json.loads(json.dumps(document)), authority[0].ca_pem)
    assert verdict.problems and all("\n" not in p for p in verdict.problems), verdict


def test_only_this_fleets_server_signs(authority: tuple[Authority, Path], tmp_path: Path) -> None:
    real, data_dir = authority
    operator = load_identity(data_dir / "identities" / "admin")  # the one `init` makes
    by_operator = sign_report(a_report(), operator.key_pem, operator.cert_pem)
    assert verify(by_operator, real.ca_pem).problems == [
        "the signature: signed by OU=admin,CN=admin, not the server"
    ]
    initialise(tmp_path, now=time.time())
    other_fleet = Authority.load(tmp_path)
    assert verify(signed(other_fleet), real.ca_pem).problems == [
        "the signature: its certificate was not issued by this fleet's CA"
    ]
    with pytest.raises(InvalidInput, match="not a PEM certificate"):
        verify(signed(real), b"not a CA")
