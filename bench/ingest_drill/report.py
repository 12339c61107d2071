"""The ingest drill's report: one markdown table of both sides, then the drill's table.

Rows a side did not measure print "-"; the product/baseline column carries the
verdicts against the targets (the round within 1.5x of the baseline, authorization
p99 within 50 ms).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from bench.console import this_command
from bench.figures import against_target, percentile
from bench.ingest_drill.drill import drill_wait
from bench.ingest_drill.side import Side

MODULE = "bench.ingest_drill"
P99_TARGET_SECONDS = 0.050


def ms(values: Sequence[float], q: float) -> str:
    return f"{1000 * percentile(sorted(values), q):.1f}" if values else "-"


def report(args: argparse.Namespace, sides: dict[str, Side]) -> str:
    base, prod = sides.get("baseline"), sides.get("product")
    columns = [s for s in (base, prod) if s is not None]
    out = [
        f"Command: `{this_command(MODULE)}`",
        "",
        f"| figure ({args.agents} agents uploading every {args.upload_every:g} s, SQLite) | "
        + " | ".join(s.name for s in columns)
        + " | product / baseline |",
        "|---|" + "---|" * (len(columns) + 1),
    ]

    def row(name: str, cells: list[str], comparison: str = "") -> None:
        out.append(f"| {name} | {' | '.join(cells)} | {comparison} |")

    row(
        f"**batches landed per second**, steady window"
        f" (offered: {args.agents / args.upload_every:.0f}/s)",
        [f"{s.steady_rate:.0f}" for s in columns],
        f"{base.steady_rate / prod.steady_rate:.2f}x (baseline / product)" if base and prod else "",
    )
    bursts = [s.burst for s in columns]
    if all(b is not None for b in bursts):
        row(
            f"**one round of uploads at once ({base.burst.sent if base and base.burst else ''}"
            " agents, one batch each): time to absorb**, s",
            [f"{s.burst.seconds:.2f}" for s in columns if s.burst],
            against_target(prod.burst.seconds / base.burst.seconds)
            if base and prod and base.burst and prod.burst
            else "",
        )
        row(
            "... batches per second in that round",
            [f"{s.burst.accepted / s.burst.seconds:.0f}" for s in columns if s.burst],
        )
        row(
            "... accepted / refused / errors (retried under the gateway's number)",
            [
                f"{s.burst.accepted} / {s.burst.refused} / {s.burst.errors} ({s.burst.retried})"
                for s in columns
                if s.burst
            ],
        )
    if prod and prod.gateway_steady:
        for phase, figures in (
            ("steady window", prod.gateway_steady),
            ("the round", prod.gateway_burst),
        ):
            a = figures.get("authorization_seconds", {})
            if not a.get("calls"):
                continue
            met = "met" if a["p99"] <= P99_TARGET_SECONDS else "MISSED"
            row(
                f"**authorization latency p50 / p99, {phase}** (the gateway's own histogram:"
                " upload in hand to verdict; bucket upper bounds), ms",
                [
                    *(["-"] if base else []),
                    f"<= {1000 * a['p50']:g} / <= {1000 * a['p99']:g}"
                    f" (n={a['calls']:.0f}, {100 * a['within_50ms']:.1f}% within 50 ms)",
                ],
                f"p99 {met} (target {1000 * P99_TARGET_SECONDS:.0f} ms)"
                if phase == "steady window"
                else "",
            )
            c, g = figures.get("commit_seconds", {}), figures.get("commit_batches", {})
            if c.get("calls"):
                row(
                    f"... sink group commits, {phase}: commits, p50 / p99 duration (ms),"
                    " p50 / p99 batches per commit",
                    [
                        *(["-"] if base else []),
                        f"{c['calls']:.0f}, <= {1000 * c['p50']:g} /"
                        f" <= {1000 * c['p99']:g}, <= {g['p50']:g} / <= {g['p99']:g}",
                    ],
                )
    lat = [s.probes.latencies if s.probes else [] for s in columns]
    row(
        f"UploadBatch round trip p50 / p99 ({args.probes} probes, every"
        f" {args.probe_every:g} s; includes the sink's commit), ms",
        [f"{ms(v, 0.5)} / {ms(v, 0.99)} (n={len(v)})" for v in lat],
    )
    row(
        "... probe batches refused / failed",
        [
            f"{sum(s.probes.refused.values())} / {sum(s.probes.errors.values())}"
            if s.probes
            else "-"
            for s in columns
        ],
    )
    if prod and prod.authorize.get("calls"):
        a = prod.authorize
        out.append(
            "| control server's AuthorizeBatches handling (its /metrics histogram, steady window):"
            " calls, within 50 ms, p50 / p99 (bucket bound), ms | "
            + ("- | " if base else "")
            + f"{a['calls']:.0f}, {100 * a['within_50ms']:.1f}%,"
            + f" <= {1000 * a['p50']:g} / <= {1000 * a['p99']:g} | |"
        )
    for who in ("server", "sink", "fleet"):
        cells = [f"{s.cpu.get(who, math.nan):.0f}" for s in columns]
        row(f"{who} CPU in the steady window, % of a core", cells)
    for who in ("server", "sink", "lease holders"):
        cells = [f"{s.burst_cpu.get(who, math.nan):.2f}" for s in columns]
        row(f"{who} CPU over the round, s", cells)
    if prod and prod.authorize_burst.get("calls") and prod.burst:
        calls = prod.authorize_burst["calls"]
        row(
            "control server's AuthorizeBatches calls over the round (the round's uploads per call)",
            [*(["-"] if base else []), f"{calls:.0f} ({prod.burst.sent / calls:.1f})"],
        )
    row("sink RSS, MiB", [f"{s.rss_mib.get('sink', math.nan):.0f}" for s in columns])
    out += ["", "The sink's files sat on: "]
    out += [f"- {s.name}: {s.sink_volume}" for s in columns]
    out += ["", "Machine load (1/5/15 min) at each phase: "]
    out += [f"- {s.name}: " + "; ".join(s.load) for s in columns]
    out += ["", "Logs (level event x count): "]
    out += [f"- {s.name} {k}: {v}" for s in columns for k, v in s.logs.items()]
    if prod and prod.drill:
        out += [
            "",
            "DRILL: fault kind x server state (agents), read "
            f"{drill_wait(args):g} s after the pause",
            "",
        ]
        out += prod.drill
    return "\n".join(out)
