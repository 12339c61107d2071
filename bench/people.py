"""People's identities for the benchmarks, issued as people get theirs.

``killswitch init`` makes one administrator; everyone else makes their own key and
request (``identity request``), which the administrator signs offline with the root
(``certs issue``). The benchmarks run those commands, so they measure the product as
it is deployed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from control.domain.identity import Role

# The callers the benchmarks use, by the role their name stands for.
OPERATORS = {
    "ic-1": Role.INCIDENT_COMMANDER,
    "sre-1": Role.SRE,
    "approver-1": Role.APPROVER,
    "approver-2": Role.APPROVER,
    "automation-1": Role.AUTOMATION,
    "employee-1": Role.EMPLOYEE,
    "ingest-1": Role.INGEST,
}


def issue_person(
    killswitch: Path, data_dir: Path, name: str, role: Role, out: Path, *, database: str = ""
) -> list[str]:
    """``name``'s identity in ``out`` (key, request, certificate, CA); the commands run."""
    request = [str(killswitch), "identity", "request", "--name", name, "--role", role.value]
    request += ["--out", str(out)]
    issue = [str(killswitch), "certs", "issue", str(out / "request.csr"), "--role", role.value]
    issue += ["--data-dir", str(data_dir), "--out", str(out / "cert.pem")]
    issue += ["--database", database] if database else []
    for argv in (request, issue):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr}")
    shutil.copy(data_dir / "pki" / "ca.pem", out / "ca.pem")
    return [shlex.join(request), shlex.join(issue), f"cp {data_dir}/pki/ca.pem {out}/"]


def issue_operators(killswitch: Path, data_dir: Path) -> None:
    """Every name of ``OPERATORS`` in ``DATA/identities/NAME``."""
    for name, role in OPERATORS.items():
        issue_person(killswitch, data_dir, name, role, data_dir / "identities" / name)
