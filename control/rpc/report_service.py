"""``Reports.GetReport``: the server builds and signs an incident's proof report.

The server, not the CLI, signs: it holds the state the report states and the key
(its TLS key) that the fleet's CA vouches for, so a report verifies offline with the
CA alone, like an audit checkpoint. An ``--insecure`` server has no key and refuses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.audit_checkpoints import CheckpointWriter
from control.domain import Hold
from control.domain import opt_out_hold_id
from control.domain.audit import AuditEntry
from control.domain.audit import ChainHead
from control.errors import Conflict
from control.errors import UnknownItem
from control.governance import Governance
from control.plane import AgentFilter
from control.plane import ControlPlane
from control.report.build import build
from control.report.signing import sign_report
from control.rpc.operator_service import required

# Well under gRPC's default 4 MiB a client accepts in one message.
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ReportSigner:
    key_pem: bytes
    cert_pem: bytes
    checkpoints: CheckpointWriter | None


def _signed(report: dict[str, Any], signer: ReportSigner) -> bytes:
    document = sign_report(report, signer.key_pem, signer.cert_pem)
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode()


class ReportService(pb_grpc.ReportsServicer):
    def __init__(
        self, plane: ControlPlane, governance: Governance, signer: ReportSigner | None
    ) -> None:
        self._plane = plane
        self._governance = governance
        self._signer = signer

    async def GetReport(  # noqa: N802
        self, request: pb.GetReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ReportChunk]:
        # Made whole before the first chunk, so an unknown hold can be looked for again.
        hold_id = required(request.hold_id, "a hold id")
        document = await self._governance.found(lambda: self._document(hold_id))
        for start in range(0, len(document), CHUNK_BYTES):
            yield pb.ReportChunk(data=document[start : start + CHUNK_BYTES])

    async def _document(self, hold_id: str) -> bytes:
        if self._signer is None:
            raise Conflict(
                "proof reports are signed with the server key, which an --insecure server"
                " does not have"
            )
        hold = self._plane.hold(hold_id)
        views = self._plane.views(AgentFilter(hold_id=hold_id))
        opt_outs = {v.agent_id: h for v in views if (h := self._opt_out(v.agent_id))}
        entries, head = await self._whole_audit()
        # After the read: the checkpoint covers every entry the excerpt may quote.
        checkpoints = self._signer.checkpoints
        checkpoint = None if checkpoints is None else await checkpoints.current()
        report = build(
            hold,
            views,
            opt_outs=opt_outs,
            audit=entries,
            head=head,
            checkpoint=checkpoint,
            now=self._plane.now(),
            epoch=self._plane.epoch,
        )
        # The report is plain data now: signing and encoding it (0.6 s for 10,000 laptops,
        # bench/report_size.py) need not hold up the agents' streams.
        return await asyncio.to_thread(_signed, report, self._signer)

    def _opt_out(self, agent_id: str) -> Hold | None:
        try:
            return self._plane.hold(opt_out_hold_id(agent_id))
        except UnknownItem:
            return None

    async def _whole_audit(self) -> tuple[list[AuditEntry], ChainHead]:
        """Every entry, a page at a time: a hold's story may start anywhere in the log."""
        entries: list[AuditEntry] = []
        while True:
            after = entries[-1].seq if entries else 0
            page, head = await self._governance.read_audit(after, 0)
            entries += page
            if not page or entries[-1].seq >= head.seq:
                return entries, head
