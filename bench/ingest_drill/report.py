"""The ingest drill's report: one markdown table of both sides, then the drill's table.

Rows a side did not measure print "-"; the product/baseline column carries the
verdicts against the targets (the round within 1.5x of the baseline, authorization
p99 within 50 ms).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

from bench.console import this_command
from bench.figures import against_target
from bench.figures import percentile
from bench.ingest_drill.drill import drill_wait
from bench.ingest_drill.side import Side

MODULE = "bench.ingest_drill"
P99_TARGET_SECONDS = 0.050


def ms(values: Sequence[float], q: float) -> str:
    return f"{1000 * percentile(sorted(values), q):.1f}" if values else "-"


@dataclass
class Table:
    """The report's lines so far, and the sides it has a column for (baseline, product)."""

    args: argparse.Namespace
    base: Side | None
    prod: Side | None
    lines: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[Side]:
        return [s for s in (self.base, self.prod) if s is not None]

    @property
    def no_baseline_figure(self) -> list[str]:
        """The baseline's cell of a figure only the product has."""
        return ["-"] if self.base else []

    def row(self, name: str, cells: list[str], comparison: str = "") -> None:
        self.lines.append(f"| {name} | {' | '.join(cells)} | {comparison} |")


def report(args: argparse.Namespace, sides: dict[str, Side]) -> str:
    t = Table(args, sides.get("baseline"), sides.get("product"))
    t.lines += [
        f"Command: `{this_command(MODULE)}`",
        "",
        f"| figure ({args.agents} agents uploading every {args.upload_every:g} s, SQLite) | "
        + " | ".join(s.name for s in t.columns)
        + " | product / baseline |",
        "|---|" + "---|" * (len(t.columns) + 1),
    ]
    base, prod = t.base, t.prod
    t.row(
        f"**batches landed per second**, steady window"
        f" (offered: {args.agents / args.upload_every:.0f}/s)",
        [f"{s.steady_rate:.0f}" for s in t.columns],
        f"{base.steady_rate / prod.steady_rate:.2f}x (baseline / product)" if base and prod else "",
    )
    round_rows(t)
    if prod and prod.gateway_steady:
        gateway_rows(t, prod)
    probe_rows(t)
    cost_rows(t)
    notes(t)
    return "\n".join(t.lines)


def round_rows(t: Table) -> None:
    """The round of uploads at once: time to absorb it against the baseline's."""
    base, prod, columns = t.base, t.prod, t.columns
    bursts = [s.burst for s in columns]
    if not all(b is not None for b in bursts):
        return
    sent = next((s.burst.sent for s in columns if s.burst), 0)
    t.row(
        f"**one round of uploads at once ({sent} agents, one batch each, {t.args.concurrency}"
        f" in flight): time to absorb**, median of {t.args.rounds} rounds, s",
        [f"{s.burst.seconds:.2f}" for s in columns if s.burst],
        against_target(prod.burst.seconds / base.burst.seconds)
        if base and prod and base.burst and prod.burst
        else "",
    )
    t.row(
        "... every round, s",
        [" / ".join(f"{seconds:.2f}" for seconds in s.rounds) for s in columns],
    )
    t.row(
        "... the box's CPU idle while the median round ran (idle and I/O wait), %",
        [f"{100 * s.burst.idle_share:.0f}" for s in columns if s.burst],
    )
    t.row(
        "... batches per second in the median round",
        [f"{s.burst.accepted / s.burst.seconds:.0f}" for s in columns if s.burst],
    )
    t.row(
        "... accepted / refused / errors (retried under the gateway's number)",
        [
            f"{s.burst.accepted} / {s.burst.refused} / {s.burst.errors} ({s.burst.retried})"
            for s in columns
            if s.burst
        ],
    )


def gateway_rows(t: Table, prod: Side) -> None:
    """The gateway's own histograms: authorization latency and group commits, per phase."""
    for phase, figures in (
        ("steady window", prod.gateway_steady),
        ("the round", prod.gateway_burst),
    ):
        a = figures.get("authorization_seconds", {})
        if not a.get("calls"):
            continue
        met = "met" if a["p99"] <= P99_TARGET_SECONDS else "MISSED"
        t.row(
            f"**authorization latency p50 / p99, {phase}** (the gateway's own histogram:"
            " upload in hand to verdict; bucket upper bounds), ms",
            [
                *t.no_baseline_figure,
                f"<= {1000 * a['p50']:g} / <= {1000 * a['p99']:g}"
                f" (n={a['calls']:.0f}, {100 * a['within_50ms']:.1f}% within 50 ms)",
            ],
            f"p99 {met} (target {1000 * P99_TARGET_SECONDS:.0f} ms)"
            if phase == "steady window"
            else "",
        )
        c, g = figures.get("commit_seconds", {}), figures.get("commit_batches", {})
        if c.get("calls"):
            t.row(
                f"... sink group commits, {phase}: commits, p50 / p99 duration (ms),"
                " p50 / p99 batches per commit",
                [
                    *t.no_baseline_figure,
                    f"{c['calls']:.0f}, <= {1000 * c['p50']:g} /"
                    f" <= {1000 * c['p99']:g}, <= {g['p50']:g} / <= {g['p99']:g}",
                ],
            )


def probe_rows(t: Table) -> None:
    """Whole UploadBatch round trips, as the probes timed them in the steady window."""
    args, columns = t.args, t.columns
    lat = [s.probes.latencies if s.probes else [] for s in columns]
    t.row(
        f"UploadBatch round trip p50 / p99 ({args.probes} probes, every"
        f" {args.probe_every:g} s; includes the sink's commit), ms",
        [f"{ms(v, 0.5)} / {ms(v, 0.99)} (n={len(v)})" for v in lat],
    )
    t.row(
        "... probe batches refused / failed",
        [
            f"{sum(s.probes.refused.values())} / {sum(s.probes.errors.values())}"
            if s.probes
            else "-"
            for s in columns
        ],
    )


def cost_rows(t: Table) -> None:
    """What the load cost: the control server's AuthorizeBatches work, CPU, memory."""
    prod, columns = t.prod, t.columns
    if prod and prod.authorize.get("calls"):
        a = prod.authorize
        t.lines.append(
            "| control server's AuthorizeBatches handling (its /metrics histogram, steady window):"
            " calls, within 50 ms, p50 / p99 (bucket bound), ms | "
            + ("- | " if t.base else "")
            + f"{a['calls']:.0f}, {100 * a['within_50ms']:.1f}%,"
            + f" <= {1000 * a['p50']:g} / <= {1000 * a['p99']:g} | |"
        )
    for who in ("server", "sink", "fleet"):
        cells = [f"{s.cpu.get(who, math.nan):.0f}" for s in columns]
        t.row(f"{who} CPU in the steady window, % of a core", cells)
    for who in ("server", "sink", "lease holders"):
        cells = [f"{s.burst_cpu.get(who, math.nan):.2f}" for s in columns]
        t.row(f"{who} CPU per timed round, s", cells)
    if prod and prod.authorize_burst.get("calls") and prod.burst:
        calls = prod.authorize_burst["calls"]
        t.row(
            "control server's AuthorizeBatches calls over the timed rounds (uploads per call)",
            [
                *t.no_baseline_figure,
                f"{calls:.0f} ({prod.burst.sent * len(prod.rounds) / calls:.1f})",
            ],
        )
    t.row("sink RSS, MiB", [f"{s.rss_mib.get('sink', math.nan):.0f}" for s in columns])


def notes(t: Table) -> None:
    """Under the table: the sinks' disks, the machine's load, the logs, then the drill."""
    columns, prod = t.columns, t.prod
    t.lines += ["", "The sink's files sat on: "]
    t.lines += [f"- {s.name}: {s.sink_volume}" for s in columns]
    t.lines += ["", "Machine load (1/5/15 min) at each phase: "]
    t.lines += [f"- {s.name}: " + "; ".join(s.load) for s in columns]
    t.lines += ["", "Logs (level event x count): "]
    t.lines += [f"- {s.name} {k}: {v}" for s in columns for k, v in s.logs.items()]
    if prod and prod.drill:
        t.lines += [
            "",
            "DRILL: fault kind x server state (agents), read "
            f"{drill_wait(t.args):g} s after the pause",
            "",
        ]
        t.lines += prod.drill
