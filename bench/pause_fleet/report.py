"""The pause benchmark's report: a markdown table per comparison, then how it was run.

Each table has a column per system and a column per subject/reference ratio; a row
nobody measured is left out. The report is printed as BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Literal

from bench.figures import against_target
from bench.pause_fleet.postgres import masked
from bench.pause_fleet.results import Enrolment
from bench.pause_fleet.results import Run
from bench.pause_fleet.systems import Comparison
from bench.pause_fleet.systems import RunKey
from bench.pause_fleet.systems import Storage
from bench.pause_fleet.systems import run_key

# How a table row compares product with baseline: not at all, a ratio, a ratio with a target.
Compare = Literal["", "ratio", "target"]


def cell(values: Sequence[float], fmt: str) -> str:
    """The median, and the range when there are several rounds."""
    if not values:
        return "-"
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def ratio(subject: Sequence[float], reference: Sequence[float], kind: str) -> str:
    """``kind``: "ratio", "bold" (a headline without a target), "target" (with the target)."""
    if not subject or not reference:
        return ""
    value = statistics.median(subject) / statistics.median(reference)
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "bold":
        return f"**{value:.2f}x**"
    return against_target(value)


def heading(comparison: Comparison, here: Sequence[Run], storage: Storage) -> str:
    repeats = "/".join(dict.fromkeys(str(r.repeat) for r in here))
    rounds = f"median of {repeats}, range in brackets"
    topology = comparison.topology
    product = f"product on {storage.describe()}"
    if comparison.subject.mtls:
        return (
            f"### {comparison.name}: {comparison.agents} agents, each on its own mTLS"
            " connection, against the bare baseline over TLS with client certificates (one"
            " connection per agent) and the product --insecure over"
            f" {topology.connections} connections; {product} ({rounds})"
        )
    return (
        f"### {comparison.name}: {comparison.agents} agents over {topology.connections}"
        f" connections; {product} ({rounds})"
    )


def comparison_table(comparison: Comparison, here: Sequence[Run], storage: Storage) -> list[str]:
    """One markdown table: a column per system, then subject/reference ratios."""
    subject = here[-1]
    references = here[:-1]
    header = [r.system.name for r in here] + [
        f"{subject.system.name} / {r.system.name}" for r in references
    ]
    lines = [
        heading(comparison, here, storage),
        "",
        "| figure | " + " | ".join(header) + " |",
        "|---" * (1 + len(header)) + "|",
    ]
    mtls = comparison.subject.mtls
    # Over mTLS, issue 17 also sets the target on connecting the fleet and on the restart.
    over_tls: Compare = "target" if mtls else "ratio"

    def row(label: str, figure: Callable[[Run], list[float]], fmt: str, compare: Compare) -> None:
        cells = [cell(figure(r), fmt) for r in here]
        if all(c == "-" for c in cells):
            return  # measured by nobody here
        for reference in references:
            # The target is against a bare baseline; against the product, a headline.
            kind = "bold" if compare == "target" and reference.system.product else compare
            cells.append(ratio(figure(subject), figure(reference), kind) if kind else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def rounds(name: str) -> Callable[[Run], list[float]]:
        return lambda r: r.samples(name)

    def enrolment(figure: Callable[[Enrolment], float]) -> Callable[[Run], list[float]]:
        return lambda r: [figure(r.enrolment)] if r.enrolment is not None else []

    row("**time to 100% STOP_REPORTED** (last ack - t0), s", rounds("p100"), ".3f", "target")
    row("ack latency p50, s", rounds("p50"), ".3f", "ratio")
    row("ack latency p99, s", rounds("p99"), ".3f", "ratio")
    row("100% seen by polling GetStatus, s", rounds("polled"), ".3f", "")
    row("100% seen by polling GetStatus on the other replicas (the last of them), s",
        rounds("polled_others"), ".3f", "")  # fmt: skip
    row("time to 100% VERIFIED_STOPPED (last verification - t0), s", rounds("verified"),
        ".2f", "ratio")  # fmt: skip
    row("100% VERIFIED_STOPPED seen by polling GetStatus (replica 0), s",
        rounds("verified_polled"), ".2f", "ratio")  # fmt: skip
    row("100% VERIFIED_STOPPED seen on the other replicas (the last of them), s",
        rounds("verified_polled_others"), ".2f", "")  # fmt: skip
    row("CreateHold round trip, s", rounds("rpc"), ".3f", "")
    row("**server RSS per agent**, KiB", lambda r: [r.kib_per_agent()], ".1f", "target")
    row("server RSS fresh, MiB", lambda r: [r.rss_fresh_kib / 1024], ".1f", "")
    row("server RSS enrolled, before connecting, MiB", enrolment(lambda e: e.rss_kib / 1024),
        ".1f", "")  # fmt: skip
    row("server RSS connected, MiB", lambda r: [r.rss_connected_kib / 1024], ".1f", "")
    for i in range(max(r.replicas for r in here) if storage.replicas > 1 else 0):
        row(f"replica {i}: agent streams", apiece("replica_streams", i), ".0f", "")
        row(f"replica {i}: RSS fresh, MiB", apiece("replica_rss_fresh_kib", i, 1 / 1024),
            ".1f", "")  # fmt: skip
        row(f"replica {i}: RSS connected, MiB",
            apiece("replica_rss_connected_kib", i, 1 / 1024), ".1f", "")  # fmt: skip
        row(f"replica {i}: idle CPU, % of a core", apiece("replica_idle_cpu", i, 100),
            ".0f", "")  # fmt: skip
    row("agents' process RSS connected, MiB", lambda r: [r.fleet_rss_kib / 1024], ".0f", "ratio")
    row("enrolment: simulator start to last certificate, s", enrolment(lambda e: e.wall),
        ".1f", "")  # fmt: skip
    row("enrolment rate, first to last certificate, agents/s", enrolment(lambda e: e.rate),
        ".0f", "")  # fmt: skip
    row("fleet connect + first ack (from simulator start), s", lambda r: [r.connect], ".1f", "")
    if mtls:
        row("**fleet connect + first ack**, the product mTLS's after enrolment (the others do"
            " not enrol), s", connected_after_enrolment, ".1f", "target")  # fmt: skip
    row("idle server CPU (all replicas), % of a core", lambda r: [r.idle_cpu * 100], ".0f", "")
    row(
        "**idle server CPU answering the agents' heartbeats and lease requests** (the"
        " baseline: a bare server and fleet of their own at the same pace), % of a core"
        " (target also <= 15)",
        lambda r: [cpu * 100 for cpu in r.idle_cpu_answering()],
        ".0f",
        "target",
    )
    row("GetStatus latency (idle, replica 0), ms", lambda r: [r.status_ms], ".1f", "")
    row("restart: listening again, s", rounds("listening"), ".2f", "")
    row("restart: all connected, s", rounds("connected"), ".2f", "ratio")
    row("restart: 100% STOP_REPORTED, s", rounds("settled"), ".2f", "ratio")
    reacked = "**restart: every agent re-acked**" if mtls else "restart: every agent re-acked"
    row(f"{reacked}, s", rounds("reacked"), ".2f", over_tls)
    lines.append("")
    if mtls:
        lines += [*tls_notes(subject, references), ""]
    return lines


def connected_after_enrolment(run: Run) -> list[float]:
    """Connect and first ack, from the fleet's start, or from its last enrolment if any."""
    return [run.connect - run.enrolment.wall if run.enrolment is not None else run.connect]


def apiece(name: str, replica: int, scale: float = 1.0) -> Callable[[Run], list[float]]:
    """One replica's value of the per-replica list ``name`` of a run (none: no such replica)."""

    def figure(run: Run) -> list[float]:
        values: Sequence[float] = getattr(run, name)
        return [values[replica] * scale] if replica < len(values) else []

    return figure


def tls_notes(mtls: Run, references: Sequence[Run]) -> list[str]:
    """How the TLS baseline got its certificates, and what mTLS costs the product."""
    lines = []
    for run in references:
        if run.certificates_made is not None:
            lines.append(
                f"The {run.system.name} fleet: {run.agents} agents, each with a certificate"
                " of its own (EC P-256, leaf + agent CA, as an enrolled agent presents),"
                f" made by control.pki in the harness in {run.certificates_made:.1f} s before"
                " its server started; the server requires them (require_client_auth) and"
                " reads no name from them."
            )
    plain = [r for r in references if r.system.product and not r.system.mtls]
    return lines + (mtls_cost(mtls, plain[0]) if plain else [])


def mtls_cost(mtls: Run, plain: Run) -> list[str]:
    """What mTLS adds per agent, from the medians of the table."""

    def per_agent_us(name: str) -> str:
        a, b = mtls.samples(name), plain.samples(name)
        if not a or not b:
            return "-"
        return f"{(statistics.median(a) - statistics.median(b)) / mtls.agents * 1e6:+.0f} µs"

    lines = [
        f"Per agent, mTLS changes the time to 100% STOP_REPORTED by {per_agent_us('p100')}"
        f" (p50 {per_agent_us('p50')}), server memory by"
        f" {mtls.kib_per_agent() - plain.kib_per_agent():+.1f} KiB and the agents' process"
        f" memory by {(mtls.fleet_rss_kib - plain.fleet_rss_kib) / mtls.agents:+.1f} KiB.",
    ]
    if mtls.enrolment is not None:
        e = mtls.enrolment
        lines.append(
            f"Enrolment: {e.agents} agents in {e.wall:.1f} s from the simulator's start"
            f" ({e.agents / e.wall:.0f} agents/s), {e.rate:.0f} agents/s first to last"
            f" certificate; server memory {(e.rss_kib - mtls.rss_fresh_kib) / e.agents:+.1f}"
            " KiB per enrolled agent before it connects."
        )
    return lines


def report(comparisons: Sequence[Comparison], runs: Mapping[RunKey, Run], storage: Storage) -> str:
    lines: list[str] = []
    for comparison in comparisons:
        here = [runs[run_key(s, comparison)] for s in comparison.systems]
        lines += comparison_table(comparison, here, storage)
    shown = [runs[run_key(s, c)] for c in comparisons for s in c.systems]
    commands = list(dict.fromkeys(r.command for r in shown))
    lines += [
        "t0 is taken just before CreateHold; ack and verification times are the server's.",
        "Restarts reuse the port; the bare server, having no store, restarts with"
        " `--epoch E --paused`.",
        *storage_notes(storage),
        "",
        "Processes started (ports and temporary paths vary per run):",
        "",
        "```",
        *commands,
        "```",
    ]
    return "\n".join(lines)


def storage_notes(storage: Storage) -> list[str]:
    if not storage.admin_url:
        return []
    notes = [
        f"The product ran on PostgreSQL ({masked(storage.admin_url)}): a fresh scratch"
        " database per product run, dropped after it. The baseline has no store.",
    ]
    if storage.replicas > 1:
        notes.append(
            f"{storage.replicas} product replicas shared it; the fleet was given every"
            " replica's address. The pause went to replica 0; its figures are replica 0's"
            " view of the whole fleet. Server memory and idle CPU are summed over the"
            " replicas (also shown apiece); the baseline is one bare server. No restart"
            " phase with several replicas."
        )
    return notes
