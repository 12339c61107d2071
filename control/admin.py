"""What an administrator does to the fleet's database directly, without a server.

``killswitch init`` and ``certs issue`` record the certificates they sign; ``audit verify
--data-dir`` reads the audit log itself, because verification must not depend on the
server's honesty. The CLI calls these and never opens the store itself. (The store is
imported when used: every other command starts without its drivers.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.identity import CertificateRecord
from control.errors import InvalidInput

# Audit entries read per page.
AUDIT_PAGE = 1000


def record_certificate(
    data_dir: Path, database: str, record: CertificateRecord, actor: str
) -> None:
    """Register an issued certificate, with its audit entry, in the fleet's database."""
    from control.store import open_store

    async def register() -> None:
        store = await open_store(data_dir, database)
        try:
            await store.record_certificate(
                record,
                AuditRecord(
                    time.time(),
                    actor,
                    "system",
                    "certs.issue",
                    target=record.subject,
                    detail=f"{record.role.value}, serial {record.serial}",
                ),
            )
        finally:
            await store.close()

    asyncio.run(register())


def read_audit_log(data_dir: Path, database: str) -> tuple[list[AuditEntry], ChainHead]:
    """Every audit entry and the head the store records, straight from the database."""
    from control.store import open_store
    from control.store.sqlite import DB_FILENAME

    async def read() -> tuple[list[AuditEntry], ChainHead]:
        if not database and not (data_dir / DB_FILENAME).exists():
            raise InvalidInput(f"no database in {data_dir}")
        store = await open_store(data_dir, database)
        try:
            entries: list[AuditEntry] = []
            while True:
                page, head = await store.read_audit(entries[-1].seq if entries else 0, AUDIT_PAGE)
                if not page:
                    return entries, head
                entries.extend(page)
        finally:
            await store.close()

    return asyncio.run(read())
