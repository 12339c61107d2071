"""History compaction: what 100,000 lifted holds cost a connect, a resync and memory.

Builds one SQLite data dir per scenario, the history written straight into the
tables (as years of incidents would leave it), and measures each scenario in a fresh
process against the real ``ControlPlane`` on the real ``SqliteStore``:

* baseline: the active holds alone, no history;
* history: the same plus ``--holds`` lifted holds (each with the resume request that
  lifted it, and one ended runbook run per 100 holds), all older than the retention,
  not yet compacted;
* compacted: the same data dir after ``HistoryCompactor.compact()``, run as
  ``serve`` runs it, before the state is loaded;
* compacted, restarted: a new process on that compacted data dir, as every later
  start finds it (the archived rows are still in their tables).

For each: the mean cost of one agent connect (``--agents`` new agents, then each
reconnecting), the median ``load_shared()`` (what every resync and NOTIFY reads) and
VmRSS after ``ControlPlane.start()``. Ratios are against the baseline of the same run.

Run: ``.venv/bin/python -m bench.history [--holds 100000] [--agents 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from control.domain import Hold
from control.domain import HoldKind
from control.domain import Scope
from control.domain import draft_hold
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.audit import AuditRecord
from control.domain.history import DEFAULT_HISTORY_RETENTION_SECONDS
from control.domain.rollout import Runbook
from control.domain.rollout import RunState
from control.domain.rollout import Wave
from control.domain.rollout import end_run
from control.domain.rollout import new_run
from control.history import HistoryCompactor
from control.logs import configure_logging
from control.plane import ControlPlane
from control.plane.cache import DesiredStateCache
from control.store import codec
from control.store.sqlite import DB_FILENAME
from control.store.sqlite import SqliteStore

ACTIVE_HOLDS = 3
HOLDS_PER_RUN = 100
LOAD_SHARED_REPEAT = 15


class Session:
    def notify(self) -> None: ...

    def close(self, reason: str) -> None: ...


def _rows(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


async def _active_holds(data_dir: Path, now: float) -> None:
    """The holds in force, through the store as an operator would make them."""
    store = await SqliteStore.open(data_dir)
    try:
        scopes = [Scope.fleet(), Scope.selector({"region": "eu"}), Scope.agents(["a-1"])]
        for number, scope in enumerate(scopes[:ACTIVE_HOLDS]):
            draft = draft_hold(
                hold_id=f"hold-active-{number}",
                kind=HoldKind.INCIDENT,
                scope=scope,
                reason="leak",
                ticket="INC-1",
                created_by="ic-1",
                created_at=now,
            )
            await store.create_hold(draft, AuditRecord(now, "ic-1", "incident-commander", "pause"))
    finally:
        await store.close()


def build(data_dir: Path, history: int, now: float) -> None:
    asyncio.run(_active_holds(data_dir, now))
    if not history:
        return
    old = now - 30 * 24 * 3600.0  # well past the default retention
    db = sqlite3.connect(data_dir / DB_FILENAME)
    (epoch,) = db.execute("SELECT epoch FROM epoch_counter").fetchone()
    holds, requests = [], []
    for number in range(history):
        hold = Hold(
            id=f"hold-old-{number:06d}",
            kind=HoldKind.INCIDENT,
            scope=Scope.selector({"team": f"t{number % 50}"}),
            reason="an incident of long ago",
            ticket=f"INC-{number}",
            created_by="ic-1",
            created_at=old,
            created_epoch=epoch + 2 * number + 1,
            lifted_at=old + 60,
            lifted_by="approver-1",
            lifted_epoch=epoch + 2 * number + 2,
        )
        holds.append(codec.hold_to_row(hold))
        request = ResumeRequest(
            id=f"resume-old-{number:06d}",
            hold_id=hold.id,
            requested_by="ic-1",
            reason="all clear",
            ticket=hold.ticket,
            created_at=old + 30,
            expires_at=old + 3630,
            state=ResumeState.EXECUTED,
            decided_by="approver-1",
            decided_at=old + 60,
            lifted_epoch=hold.lifted_epoch,
        )
        requests.append(codec.resume_to_row(request))
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=10_000)))
    runs = []
    for number in range(history // HOLDS_PER_RUN):
        run = new_run(
            book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=old, epoch=1
        )
        run = dataclasses.replace(run, id=f"run-old-{number:05d}", version=3)
        runs.append(codec.run_to_row(end_run(run, RunState.COMPLETED, now=old, repaused=False)))
    with db:
        db.executemany(_rows("holds", codec.HOLD_COLUMNS), holds)
        db.executemany(_rows("resume_requests", codec.RESUME_COLUMNS), requests)
        db.executemany(_rows("runbook_runs", codec.RUN_COLUMNS), runs)
        db.execute("UPDATE epoch_counter SET epoch = ?", (epoch + 2 * history,))
    db.close()


def rss_kib() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def filter_every_hold(cache: DesiredStateCache) -> list[Hold]:
    """``active_holds`` as it was before ``KnownHolds``: for the reference row."""
    every = cache.holds._all.values()
    return sorted((h for h in every if h.active), key=lambda h: h.created_epoch)


async def measure(data_dir: Path, agents: int, compact: bool, old: bool) -> dict[str, Any]:
    if old:
        DesiredStateCache.active_holds = filter_every_hold  # type: ignore[assignment,method-assign]
    before_open = rss_kib()
    store = await SqliteStore.open(data_dir)
    compacted = 0
    compact_seconds = 0.0
    if compact:
        compactor = HistoryCompactor(
            store, [], clock=time.time, retention=DEFAULT_HISTORY_RETENTION_SECONDS
        )
        began = time.perf_counter()
        compacted = (await compactor.compact()).total
        compact_seconds = time.perf_counter() - began
    plane = ControlPlane(store, clock=time.time, flush_interval=3600.0)
    await plane.start()
    after_start = rss_kib()
    try:
        timings = []
        for _ in range(LOAD_SHARED_REPEAT):
            began = time.perf_counter()
            shared = await store.load_shared()
            timings.append(time.perf_counter() - began)
        labels = [{"region": "eu" if n % 2 else "us", "team": f"t{n % 50}"} for n in range(agents)]
        connects = []
        for _round in range(2):  # new agents, then the same agents reconnecting
            began = time.perf_counter()
            for number in range(agents):
                plane.connect(f"a-{number}", labels[number], Session())
            connects.append((time.perf_counter() - began) / agents)
        return {
            "holds_loaded": len(shared.holds),
            "requests_loaded": len(shared.resume_requests),
            "runs_loaded": len(shared.runs),
            "archived": compacted,
            "compact_s": compact_seconds,
            "load_shared_ms": statistics.median(timings) * 1000,
            "connect_new_us": connects[0] * 1e6,
            "connect_again_us": connects[1] * 1e6,
            "rss_mib": after_start / 1024,
            "rss_start_mib": (after_start - before_open) / 1024,
        }
    finally:
        await plane.stop()
        await store.close()


def child(args: argparse.Namespace) -> None:
    result = asyncio.run(measure(Path(args.child), args.agents, args.compact, args.old))
    print(json.dumps(result))


def run_child(data_dir: Path, agents: int, *flags: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.history", "--child", str(data_dir)]
    command += ["--agents", str(agents), *flags]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--holds", type=int, default=100_000, help="lifted holds of history")
    parser.add_argument("--agents", type=int, default=2000, help="agents that connect")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging("console", "warning")
    if args.child:
        child(args)
        return
    print("command:", shlex.join([Path(sys.executable).name, "-m", "bench.history", *sys.argv[1:]]))
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        base, history = Path(tmp) / "baseline", Path(tmp) / "history"
        build(base, 0, now)
        began = time.perf_counter()
        build(history, args.holds, now)
        print(f"built {args.holds} lifted holds of history in {time.perf_counter() - began:.1f} s")
        rows = {
            "baseline": run_child(base, args.agents),
            "history, old active_holds": run_child(history, args.agents, "--old"),
            "history, not compacted": run_child(history, args.agents),
            "history, compacted": run_child(history, args.agents, "--compact"),
            # The steady state: the archived rows are still in their tables.
            "compacted, restarted": run_child(history, args.agents),
        }
    report(rows)


def report(rows: dict[str, dict[str, Any]]) -> None:
    base = rows["baseline"]
    metrics = [
        ("connect, new agent (us)", "connect_new_us"),
        ("connect, reconnect (us)", "connect_again_us"),
        ("load_shared / resync (ms)", "load_shared_ms"),
        ("VmRSS after start (MiB)", "rss_mib"),
        ("RSS added by open+start (MiB)", "rss_start_mib"),
    ]
    print(f"{'':32}" + "".join(f"{name:>26}" for name in rows))
    loaded = [
        f"{r['holds_loaded']}/{r['requests_loaded']}/{r['runs_loaded']}" for r in rows.values()
    ]
    print(f"{'holds/requests/runs loaded':32}" + "".join(f"{c:>26}" for c in loaded))
    archived = [f"{r['archived']} in {r['compact_s']:.2f} s" for r in rows.values()]
    print(f"{'archived before start':32}" + "".join(f"{c:>26}" for c in archived))
    for label, key in metrics:
        cells = [f"{row[key]:.2f} ({row[key] / base[key]:.2f}x)" for row in rows.values()]
        print(f"{label:32}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
