"""What the pause benchmark waits for: conditions on GetStatus, polled on every replica.

The harness learns the fleet's state only as an operator would, from GetStatus's
counts per state; each condition below is "every one of N agents is in such a state".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from killswitch.v1 import killswitch_pb2 as pb

from bench.harness import Operator
from bench.harness import by_state
from bench.harness import poll

OFFLINE_STATES = frozenset({"OFFLINE_AT_RISK", "OFFLINE_LEASE_EXPIRED", "OFFLINE", "NEVER_SEEN"})
# An agent that acked its stop; the product then verifies it a heartbeat later.
STOPPED_STATES = frozenset({"STOP_REPORTED", "VERIFIED_STOPPED"})
VERIFIED = "VERIFIED_STOPPED"


def all_in(state: str, agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents known, settled, and in ``state``."""

    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and s.settled == agents and by_state(s) == {state: agents}

    return check


def all_stopped(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents acked the pause (reported, or already verified)."""

    def check(s: pb.GetStatusResponse) -> bool:
        counts = by_state(s)
        return s.total == agents and sum(counts.get(k, 0) for k in STOPPED_STATES) == agents

    return check


def all_verified(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents verified stopped by the product."""

    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and by_state(s) == {VERIFIED: agents}

    return check


def all_connected(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and not OFFLINE_STATES & by_state(s).keys()

    return check


def poll_replicas(
    ops: Sequence[Operator],
    what: str,
    check: Callable[[pb.GetStatusResponse], bool],
    *,
    since: float,
    timeout: float,
    interval: float,
) -> list[float]:
    """``poll`` every replica at once, each on its own thread; seconds per replica."""
    if len(ops) == 1:
        return [poll(ops[0], what, check, since=since, timeout=timeout, interval=interval)]
    with ThreadPoolExecutor(len(ops)) as pool:
        futures = [
            pool.submit(poll, op, f"{what} on replica {i}", check, since=since,
                        timeout=timeout, interval=interval)
            for i, op in enumerate(ops)
        ]  # fmt: skip
        return [f.result() for f in futures]


def others(values: Sequence[float]) -> float:
    """The last of the replicas other than replica 0 (NaN: there is only replica 0)."""
    return max(values[1:]) if len(values) > 1 else math.nan
