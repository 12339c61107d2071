"""The proof report for people: one self-contained, printable HTML page.

Rendered from the report's JSON, every value escaped: agent ids, labels, reasons and
audit details are written by people and agents, never trusted as markup. No script,
no external style or font: the page must open the same, offline, years from now.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from html import escape
from typing import Any

from control.report.build import when

_STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:2em;color:#111}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #999}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #bbb;padding:2px 5px;
text-align:left;vertical-align:top}th{background:#eee}
td.hash{font-family:monospace;font-size:11px;word-break:break-all}
.bad{color:#a00;font-weight:bold}dl{display:grid;grid-template-columns:max-content auto;
gap:2px 1em}dt{font-weight:bold}dd{margin:0}
@media print{body{margin:0}tr{break-inside:avoid}}
"""


def _text(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    return str(value)


def _cell(value: Any, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{escape(_text(value))}</td>"


def _table(headings: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _facts(pairs: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(_text(v))}</dd>" for k, v in pairs)
    return f"<dl>{items}</dl>"


def _laptop(row: Mapping[str, Any]) -> str:
    violation = row["violation"]
    opt_out = row["opt_out"]
    cells = [
        _cell(row["agent_id"]),
        _cell(row["labels"]),
        _cell(row["state"], "" if row["verified_at"] else "bad"),
        _cell(row["directive_sent_at"]),
        _cell(row["acked_at"] if row["acked_pause"] else None),
        _cell(row["verified_at"]),
        _cell(row["seconds_to_verified"]),
        _cell(row["lease_expires_at"]),
        _cell(
            f"{violation['at']}: {violation['evidence']}"
            if violation
            else row["violations_audited"] or None,
            "bad" if violation or row["violations_audited"] else "",
        ),
        _cell(row["uploads_refused"]),
        _cell(
            row["events_accepted_after_pause"], "bad" if row["events_accepted_after_pause"] else ""
        ),
        _cell(f"{opt_out['since']} ({opt_out['reason']})" if opt_out else None),
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _audit_row(entry: Mapping[str, Any]) -> str:
    cells = [
        _cell(entry.get("seq")),
        _cell(when(entry["at"]) if isinstance(entry.get("at"), float) else entry.get("at")),
        _cell(f"{entry.get('actor')} ({entry.get('role')})"),
        _cell(entry.get("action")),
        _cell(entry.get("target")),
        _cell(
            " ".join(filter(None, [entry.get("reason"), entry.get("ticket"), entry.get("detail")]))
        ),
        _cell(entry.get("result")),
        _cell(entry.get("hash"), "hash"),
    ]
    return f"<tr>{''.join(cells)}</tr>"


_LAPTOP_HEADINGS = [
    "Laptop",
    "Labels",
    "State",
    "Directive sent",
    "Pause acked",
    "Verified",
    "Seconds to verified",
    "Lease expires",
    "Violations",
    "Uploads refused",
    "Events accepted after pause",
    "Opt-out",
]


def render(report: Mapping[str, Any]) -> str:
    hold, figures, audit = report["hold"], report["figures"], report["audit"]
    title = f"Proof report: hold {hold['id']}"
    laptops = _table(_LAPTOP_HEADINGS, (_laptop(row) for row in report["laptops"]))
    unreached = _table(
        ["Laptop", "State", "Why"],
        (
            f"<tr>{_cell(r['agent_id'])}{_cell(r['state'])}{_cell(r['why'])}</tr>"
            for r in figures["never_reached"]
        ),
    )
    entries = _table(
        [
            "Seq",
            "At",
            "Actor",
            "Action",
            "Target",
            "Reason / ticket / detail",
            "Result",
            "Chain hash",
        ],
        (_audit_row(e) for e in audit["entries"]),
    )
    head = audit["head"]
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<p>Generated {escape(_text(report['generated_at']))}"
            f" at epoch {escape(_text(report['epoch']))}."
            " The signed record is <code>report.json</code> beside this page; check it with"
            " <code>killswitch report verify DIR</code>.</p>",
            "<h2>The hold</h2>",
            _facts(
                [
                    ("Hold", hold["id"]),
                    ("Kind", hold["kind"]),
                    ("Scope", hold["scope"]),
                    ("Reason", hold["reason"]),
                    ("Ticket", hold["ticket"]),
                    ("Paused by", hold["created_by"]),
                    ("Paused at", hold["created_at"]),
                    ("Epoch", hold["created_epoch"]),
                    ("Active", hold["active"]),
                    ("Lifted at", hold["lifted_at"]),
                    ("Lifted by", hold["lifted_by"]),
                ]
            ),
            "<h2>Fleet</h2>",
            _facts(
                [
                    ("Laptops", figures["laptops"]),
                    ("Verified stopped", f"{figures['verified']} ({figures['verified_percent']}%)"),
                    ("Seconds to 100% verified", figures["seconds_to_all_verified"]),
                    ("p50 seconds to verified", figures["p50_seconds_to_verified"]),
                    ("p99 seconds to verified", figures["p99_seconds_to_verified"]),
                    ("Laptops with violations", figures["violations"]),
                    ("Uploads refused", figures["uploads_refused"]),
                    ("Events accepted after the pause", figures["events_accepted_after_pause"]),
                    ("Opted out", figures["opted_out"]),
                ]
            ),
            f"<h2>Never reached ({len(figures['never_reached'])})</h2>",
            unreached,
            "<h2>Laptops</h2>",
            laptops,
            "<h2>Audit excerpt</h2>",
            f"<p>Audit head when generated: seq {escape(_text(head['seq']))},"
            f" hash <code>{escape(_text(head['hash']))}</code>. The latest signed audit"
            f" checkpoint is in <code>report.json</code>"
            f"{'' if audit['checkpoint'] else ' (none: the server had not written one)'}.</p>",
            entries,
            "</body></html>\n",
        ]
    )
