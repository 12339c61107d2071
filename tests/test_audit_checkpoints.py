"""Signed audit checkpoints, written by a real server and held against its database.

The server signs its audit head into ``DATA/audit-checkpoints`` while it runs and when
it stops; ``killswitch audit verify --checkpoints`` must then catch what the chain alone
cannot: a tail cut back together with the recorded head, and a rewritten history whose
hashes were recomputed. A checkpoint not signed by the server is refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from control.audit_checkpoints import sign
from control.domain.audit import AuditEntry
from control.domain.audit import ChainHead
from control.domain.audit import chain
from control.store.sqlite import SqliteStore
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import wait_for
from tests.test_audit_tamper import tamper


def checkpoint_files(server: ServerProcess) -> list[Path]:
    return sorted((server.data_dir / "audit-checkpoints").glob("checkpoint-*.json"))


@pytest.fixture
def stopped(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server that recorded some actions, checkpointed them, and stopped."""
    server = start_server("--audit-checkpoint-interval", "0.2")
    cli = Cli(server)
    for n in range(3):
        hold = cli.pause("--all", "--reason", f"drill {n}", "--ticket", f"INC-{n}")
        cli.resume(hold)
    head = int(cli.ok("audit", "verify").split("head ")[1].split(":")[0])
    # While running, the checkpoint catches up with the head within an interval or two.
    wait_for(
        lambda: any(p.name == f"checkpoint-{head:012d}.json" for p in checkpoint_files(server)),
        10,
        f"a checkpoint of entry {head}",
    )
    server.stop()
    return server


def verify(server: ServerProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    checkpoints = str(server.data_dir / "audit-checkpoints")
    return Cli(server).run(
        "audit", "verify", "--data-dir", str(server.data_dir), "--checkpoints", checkpoints, *extra
    )


def newest(server: ServerProcess) -> tuple[Path, dict[str, object]]:
    path = checkpoint_files(server)[-1]
    return path, json.loads(path.read_text())


def test_an_untouched_log_passes_against_the_servers_checkpoints(stopped: ServerProcess) -> None:
    result = verify(stopped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit log intact" in result.stdout
    # The last checkpoint (written at shutdown) covers every entry.
    _, data = newest(stopped)
    assert f"head {data['seq']}:{data['hash']}" in result.stdout
    # The same checkpoints as syslog lines gathered into one file (--audit-syslog).
    gathered = stopped.data_dir.parent / "syslog.txt"
    gathered.write_text(
        "".join(
            f"Dec  3 10:00:00 host killswitch[42]: {p.read_text().strip()}\n"
            for p in checkpoint_files(stopped)
        )
        + "Dec  3 10:00:01 host sshd[7]: unrelated\n"
    )
    from_syslog = Cli(stopped).run(
        "audit", "verify", "--data-dir", str(stopped.data_dir), "--checkpoints", str(gathered)
    )
    assert from_syslog.returncode == 0, from_syslog.stdout


def test_a_tail_cut_with_its_head_fails_naming_the_checkpoint(stopped: ServerProcess) -> None:
    _, data = newest(stopped)
    keep = int(str(data["seq"])) - 2
    tamper(
        stopped.data_dir,
        f"""DELETE FROM audit_log WHERE seq > {keep};
        UPDATE audit_head SET seq = {keep}, hash = (SELECT hash FROM audit_log WHERE seq = {keep})
        """,
    )
    # The chain alone cannot tell: the cut is self-consistent.
    assert Cli(stopped).run("audit", "verify", "--data-dir", str(stopped.data_dir)).returncode == 0
    result = verify(stopped)
    assert result.returncode == 1
    # Named: the first checkpoint (lowest seq) that covers a cut entry.
    cut = next(p for p in checkpoint_files(stopped) if int(p.stem.split("-")[1]) > keep)
    assert result.stdout.strip() == (
        f"TAMPERED: audit entry {keep + 1}: log truncated:"
        f" checkpoint {cut.name} says {int(cut.stem.split('-')[1])} entries"
    )


def rewrite_history(data_dir: Path, seq: int) -> None:
    """Change one entry's reason and recompute every hash after it, and the head: what
    someone with write access to the database alone can do, leaving a valid chain."""

    async def read() -> list[AuditEntry]:
        store = await SqliteStore.open(data_dir)
        try:
            entries, _ = await store.read_audit(0, 10_000)
            return entries
        finally:
            await store.close()

    entries = asyncio.run(read())
    rewritten: list[AuditEntry] = entries[: seq - 1]
    for entry in entries[seq - 1 :]:
        record = entry.record
        if entry.seq == seq:
            record = replace(record, reason="routine maintenance")
        rewritten.append(chain(rewritten[-1] if rewritten else None, record))
    updates = "".join(
        f"UPDATE audit_log SET reason = '{e.record.reason}', prev_hash = '{e.prev_hash}',"
        f" hash = '{e.hash}' WHERE seq = {e.seq};"
        for e in rewritten[seq - 1 :]
    )
    last = rewritten[-1]
    tamper(data_dir, f"{updates} UPDATE audit_head SET hash = '{last.hash}' WHERE seq = {last.seq}")


def test_a_rewritten_entry_fails_naming_the_checkpoint(stopped: ServerProcess) -> None:
    first = checkpoint_files(stopped)[0]
    covered = int(json.loads(first.read_text())["seq"])
    rewrite_history(stopped.data_dir, covered)
    assert Cli(stopped).run("audit", "verify", "--data-dir", str(stopped.data_dir)).returncode == 0
    result = verify(stopped)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"TAMPERED: audit entry {covered}: does not match checkpoint {first.name}"
    )


def test_a_checkpoint_the_server_did_not_sign_is_refused(stopped: ServerProcess) -> None:
    path, data = newest(stopped)
    directory = path.parent
    # Someone with the database and an operator's key: a CA-issued certificate, not the server's.
    operator = stopped.identity("ic-1")
    head = ChainHead(int(str(data["seq"])) + 5, "0" * 64)
    forged = sign(
        head, 1.8e9, (operator / "key.pem").read_bytes(), (operator / "cert.pem").read_bytes()
    )
    (directory / "checkpoint-999999999998.json").write_text(forged)
    result = verify(stopped)
    assert result.returncode == 1
    assert "checkpoint checkpoint-999999999998.json: signed by" in result.stdout
    assert "not the server" in result.stdout
    # The server's own checkpoint, its figures changed: the signature no longer fits.
    (directory / "checkpoint-999999999998.json").unlink()
    (directory / "checkpoint-999999999999.json").write_text(
        json.dumps({**data, "seq": int(str(data["seq"])) - 1})
    )
    result = verify(stopped)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        "TAMPERED: checkpoint checkpoint-999999999999.json: forged (its signature does not verify)"
    )


def test_checkpoints_need_the_server_key(tmp_path: Path) -> None:
    """Without a key (``--insecure``) there is nothing to sign with: asking is refused."""
    from tests.conftest import BIN

    result = subprocess.run(
        [str(BIN / "killswitch"), "serve", "--data-dir", str(tmp_path), "--insecure",
         "--audit-checkpoints", str(tmp_path / "cp")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "signed with the server key" in result.stderr
    assert "Traceback" not in result.stderr
