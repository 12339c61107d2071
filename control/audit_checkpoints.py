"""Signed audit checkpoints: the chain's head, anchored outside the database.

The hash chain catches an edited or deleted entry, but someone who can write the
database can cut the tail and its recorded head together and leave a valid, shorter
chain. So the server periodically (at start, every ``interval`` while the head moves,
and on shutdown) signs the head (seq, hash, time) with its TLS key and writes it to a
directory outside the database, and optionally to syslog. Someone with the database
alone cannot forge one (no server key) and cannot reach the checkpoints to remove
them; ``killswitch audit verify --checkpoints`` holds the chain to them.

A checkpoint is one JSON line, self-contained: it carries the server certificate that
signed it, which a verifier checks was issued by the fleet's CA to the server (not to
an operator, whose key could sign too).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import syslog
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import structlog
from cryptography import x509

from control import server_signature
from control.domain.audit import AuditEntry
from control.domain.audit import ChainHead
from control.domain.audit import Checkpoint
from control.domain.audit import verify_checkpoints
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.pki import CA_CERT_FILE
from control.pki import PKI_DIR

if TYPE_CHECKING:
    from control.store import Store

log = structlog.get_logger("killswitch.audit")

KIND = "killswitch-audit-checkpoint/1"
DEFAULT_DIR = "audit-checkpoints"
# How long a stopping server waits for its last checkpoint (see CheckpointWriter.stop).
STOP_WRITE_SECONDS = 2.0
DEFAULT_INTERVAL = 60.0
# Larger than any real seq, so a read after it returns just the head.
_AFTER_EVERYTHING = 2**62
_FILE_PATTERN = "checkpoint-*.json"


def _payload(seq: int, digest: str, at: float) -> bytes:
    """What is signed: canonical JSON of the checkpoint's facts."""
    facts = {"kind": KIND, "seq": seq, "hash": digest, "at": at}
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def sign(head: ChainHead, at: float, key_pem: bytes, cert_pem: bytes) -> str:
    """The checkpoint as one JSON line."""
    signature = server_signature.sign(
        _payload(head.seq, head.hash, at), key_pem, "audit checkpoints"
    )
    return json.dumps(
        {
            "kind": KIND,
            "seq": head.seq,
            "hash": head.hash,
            "at": at,
            "signer": cert_pem.decode(),
            "signature": signature,
        },
        sort_keys=True,
    )


# ------------------------------------------------------------------ verifying


def checked(name: str, data: Any, ca: x509.Certificate) -> Checkpoint | str:
    """The checkpoint if the CA's server signed it; else why it is refused."""
    try:
        seq, digest, at = data["seq"], data["hash"], data["at"]
        signer = x509.load_pem_x509_certificate(data["signer"].encode())
        signature = base64.b64decode(data["signature"], validate=True)
        if not (isinstance(seq, int) and isinstance(digest, str) and isinstance(at, float)):
            raise TypeError
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"checkpoint {name}: unreadable (not a killswitch audit checkpoint)"
    why = server_signature.problem(signer, signature, _payload(seq, digest, at), at, ca)
    if why is not None:
        return f"checkpoint {name}: {why}"
    return Checkpoint(name, seq, digest, at)


def _records(path: Path) -> list[tuple[str, str]]:
    """(name, JSON text) of each checkpoint: every file of a directory, or every
    checkpoint line of one file (e.g. the server's syslog lines, gathered)."""
    try:
        if path.is_dir():
            return [(p.name, p.read_text()) for p in sorted(path.glob(_FILE_PATTERN))]
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read checkpoints {path}: {exc.strerror}") from None
    return [
        (f"{path.name}:{number}", line[line.index("{") :])
        for number, line in enumerate(lines, 1)
        if KIND in line and "{" in line
    ]


def load(path: Path, ca_pem: bytes) -> tuple[list[Checkpoint], list[str]]:
    """The checkpoints at ``path`` that the server signed, and why any others were refused."""
    if not path.exists():
        raise InvalidInput(f"no checkpoints at {path}")
    ca = x509.load_pem_x509_certificate(ca_pem)
    good: list[Checkpoint] = []
    refused: list[str] = []
    for name, text in _records(path):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        verdict = checked(name, data, ca)
        (refused.append if isinstance(verdict, str) else good.append)(verdict)  # type: ignore[arg-type]
    return good, refused


def problem_with(entries: list[AuditEntry], path: Path, ca_pem: bytes) -> str | None:
    """``audit verify --checkpoints``: one line naming the checkpoint that fails, or None.

    A checkpoint that does not verify is itself a finding (someone wrote it who is not
    the server), so it fails verification rather than being skipped.
    """
    checkpoints, refused = load(path, ca_pem)
    if refused:
        return refused[0]
    if not checkpoints:
        return f"no audit checkpoints in {path} (removed, or the wrong path?)"
    problem = verify_checkpoints(entries, checkpoints)
    return None if problem is None else str(problem)


def ca_for_verify(data_dir: str, identity_dir: str) -> bytes:
    """The CA a verifier trusts: the data directory's, else the caller's identity's."""
    path = Path(data_dir) / PKI_DIR / CA_CERT_FILE if data_dir else None
    if path is None and identity_dir:
        path = Path(identity_dir) / CA_CERT_FILE
    if path is None:
        raise InvalidInput("--checkpoints needs the CA: pass --data-dir or --identity")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the CA {path}: {exc.strerror}") from None


# ------------------------------------------------------------------ writing


class CheckpointWriter:
    """Writes a signed checkpoint when started, every ``interval`` if the head moved,
    and when stopped. Several replicas may share one directory: a checkpoint's file is
    named by its seq, so theirs for the same head simply replace each other."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        *,
        key_pem: bytes,
        cert_pem: bytes,
        clock: Callable[[], float],
        interval: float = DEFAULT_INTERVAL,
        to_syslog: bool = False,
    ) -> None:
        self._store = store
        self.directory = directory
        self._key_pem, self._cert_pem = key_pem, cert_pem
        self._clock = clock
        self._interval = interval
        self._to_syslog = to_syslog
        self._written: ChainHead | None = None
        # The newest checkpoint this writer wrote, as its JSON line.
        self.latest: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KillswitchError(
                f"cannot create the audit checkpoint directory {self.directory}: {exc.strerror}"
            ) from None
        if self._to_syslog:
            syslog.openlog("killswitch", syslog.LOG_PID, syslog.LOG_AUTH)
        try:
            await self.write()  # a directory it cannot write stops the start, not later ticks
        except OSError as exc:
            raise KillswitchError(
                f"cannot write audit checkpoints to {self.directory}: {exc.strerror}"
            ) from None
        self._task = asyncio.create_task(self._run(), name="audit-checkpoints")

    async def stop(self) -> None:
        """The last checkpoint, if the store answers within ``STOP_WRITE_SECONDS``.

        A server told to stop while its database is away would otherwise wait out the
        pool's connection timeout (10 s) for a head it cannot read: a replica an operator
        restarts during an outage would hang. The checkpoint written last covers what it can.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                async with asyncio.timeout(STOP_WRITE_SECONDS):
                    await self._write_logged()
            except TimeoutError:
                log.warning(
                    "audit_checkpoint_failed",
                    error=f"no answer from the store within {STOP_WRITE_SECONDS} s at stop",
                )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._write_logged()

    async def _write_logged(self) -> None:
        """A failed checkpoint is logged, not fatal: the next one covers the same entries."""
        try:
            await self.write()
        except (KillswitchError, OSError) as exc:
            log.warning("audit_checkpoint_failed", error=str(exc))

    async def current(self) -> str | None:
        """A checkpoint of the head as it is now (written if the head moved), for a proof
        report to carry; the previous one if this write fails."""
        await self._write_logged()
        return self.latest

    async def write(self) -> ChainHead | None:
        """Sign and write the current head, unless it is empty or already written."""
        _, head = await self._store.read_audit(_AFTER_EVERYTHING, 1)
        if head.seq == 0 or head == self._written:
            return None
        line = sign(head, self._clock(), self._key_pem, self._cert_pem)
        path = self.directory / f"checkpoint-{head.seq:012d}.json"
        await asyncio.to_thread(_write_durably, path, line + "\n")
        if self._to_syslog:
            syslog.syslog(syslog.LOG_INFO, line)
        self._written, self.latest = head, line
        log.info("audit_checkpoint", seq=head.seq, hash=head.hash, path=str(path))
        return head


def _write_durably(path: Path, text: str) -> None:
    """Whole or not at all: written aside (a name of its own: replicas may share the
    directory and write the same checkpoint at once), synced, then renamed into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
