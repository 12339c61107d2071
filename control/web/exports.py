"""``GET /export/agents.csv`` and ``/export/agents.json``: every row of the filtered view.

Streamed in chunks, so a fleet of any size downloads without being held in memory
as one document; the rows are the ones the person may see (``api.select``).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC
from datetime import datetime
from typing import Any

from aiohttp import web

from control.domain.identity import Principal
from control.plane import AgentView
from control.plane import ControlPlane
from control.web import api
from control.web.headers import harden

EXPORT_CHUNK = 500


class Exports:
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def _start_export(
        self, request: web.Request, principal: Principal, extension: str, content_type: str
    ) -> tuple[list[Any], web.StreamResponse]:
        """The rows of the filtered view, and a download response ready to stream them."""
        views = api.select(self._plane, api.parse_query(request.query), principal)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "Content-Disposition": f'attachment; filename="agents-{stamp}.{extension}"',
            }
        )
        harden(response)
        await response.prepare(request)
        return views, response

    async def as_csv(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        views, response = await self._start_export(
            request, principal, "csv", "text/csv; charset=utf-8"
        )
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(api.CSV_COLUMNS)
        for start in range(0, len(views), EXPORT_CHUNK):
            for view in views[start : start + EXPORT_CHUNK]:
                writer.writerow(api.csv_cells(api.row(AgentView(*view))))
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
        if buffer.getvalue():
            await response.write(buffer.getvalue().encode())
        await response.write_eof()
        return response

    async def as_json(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        views, response = await self._start_export(request, principal, "json", "application/json")
        await response.write(b"[")
        for start in range(0, len(views), EXPORT_CHUNK):
            chunk = ",\n".join(
                json.dumps(api.row(AgentView(*v))) for v in views[start : start + EXPORT_CHUNK]
            )
            await response.write(((",\n" if start else "\n") + chunk).encode())
        await response.write(b"\n]\n")
        await response.write_eof()
        return response
