"""The dashboard's readiness panel: laptops that would not honour a pause now.

Shown to incident commanders and SREs (the roles ``GetReadiness`` allows), above the
fleet table; the same assessment as ``killswitch readiness``.
"""

from __future__ import annotations

from typing import Any

from control.domain.identity import Role
from control.domain.readiness import ReadinessReport
from control.web.pages import e

READINESS_ROLES = frozenset({Role.INCIDENT_COMMANDER, Role.SRE})
# The panel lists this many laptops; `killswitch readiness` lists them all.
PANEL_ROWS = 50


def readiness_data(report: ReadinessReport) -> dict[str, Any]:
    return {
        "agents": report.agents,
        "ready": report.ready,
        "cannot_honour": sum(f.cannot_honour for f in report.findings),
        "policy": report.policy.describe(),
        "classes": {
            cls.value: {"agents": n, "cannot_honour": cls.cannot_honour}
            for cls, n in report.counts().items()
        },
        "findings": [
            {
                "agent_id": f.agent_id,
                "classes": [c.value for c in f.classes],
                "details": list(f.details),
                "cannot_honour": f.cannot_honour,
            }
            for f in report.findings
        ],
    }


def readiness_panel(data: dict[str, Any]) -> str:
    counts = "".join(
        f"<li>{e(name)}: <strong>{c['agents']}</strong>"
        f"{' (cannot honour)' if c['cannot_honour'] else ' (warning)'}</li>"
        for name, c in data["classes"].items()
        if c["agents"]
    )
    rows = "".join(
        f'<tr><td><a href="/agents/{e(f["agent_id"])}">{e(f["agent_id"])}</a></td>'
        f"<td>{'cannot honour' if f['cannot_honour'] else 'warning'}</td>"
        f"<td>{e(', '.join(f['classes']))}</td><td>{e('; '.join(f['details']))}</td></tr>"
        for f in data["findings"][:PANEL_ROWS]
    )
    more = len(data["findings"]) - PANEL_ROWS
    table = (
        "<table><thead><tr><th>Laptop</th><th>Severity</th><th>Classes</th><th>Why</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else ""
    )
    return (
        '<section id="readiness"><h2>Readiness</h2>'
        f"<p>{data['ready']} of {data['agents']} laptops ready;"
        f" <strong>{data['cannot_honour']}</strong> would not honour a pause now.</p>"
        f"<ul>{counts}</ul>{table}"
        + (f"<p>and {more} more: <code>killswitch readiness</code></p>" if more > 0 else "")
        + f'<p class="muted">Policy: {e(data["policy"])}</p></section>'
    )
