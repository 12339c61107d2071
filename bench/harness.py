"""The benchmarks' operator: the same Operator API calls on the product and the baseline.

One harness drives the real ``killswitch serve`` and the bare grpc.aio server
(``bench.bare_server``) alike, so the product/baseline ratios compare the servers and
not two clients. It pauses and resumes as people do (resuming takes two: ``ic-1``
requests, ``approver-1`` approves) and learns about the fleet only by polling
GetStatus, as an operator would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from killswitch.v1 import killswitch_pb2 as pb

from bench.procs import Child
from control.client import Credentials
from control.client import OperatorClient
from control.errors import KillswitchError
from control.pki import load_identity

# Who the harness is: on a plaintext server it claims these names (the bare server
# ignores the claim); over mTLS it presents the certificates `killswitch init` made.
INCIDENT_COMMANDER = ("ic-1", "incident-commander")
APPROVER = ("approver-1", "approver")
# The harness's own channel must notice a restarted server at once, not after
# gRPC's default 1 s+ reconnect backoff, or it would add that to the figures.
HARNESS_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def person(target: str, name: str, role: str, identities: Path | None) -> OperatorClient:
    """One person on one channel: a certificate (mTLS) or a claimed name (plaintext)."""
    credentials = (
        Credentials(insecure_claim=f"{name}:{role}")
        if identities is None
        else Credentials(identity=load_identity(identities / name))
    )
    return OperatorClient(
        target, credentials, timeout=30, stream_timeout=60, options=HARNESS_CHANNEL_OPTIONS
    )


class Operator:
    """The harness's view of a server: the same calls for the product and the baseline.

    ``identities``: the data dir's ``identities`` folder of an mTLS server, else None.
    """

    def __init__(self, target: str, identities: Path | None) -> None:
        self._ic = person(target, *INCIDENT_COMMANDER, identities)
        self._approver = person(target, *APPROVER, identities)

    def close(self) -> None:
        self._ic.close()
        self._approver.close()

    def status(self) -> pb.GetStatusResponse:
        return self._ic.get_status(pb.GetStatusRequest())

    def answers(self) -> bool:
        try:
            self._ic.with_timeout(1).get_status(pb.GetStatusRequest())
        except KillswitchError:
            return False
        return True

    def create_hold(self) -> pb.CreateHoldResponse:
        request = pb.CreateHoldRequest(
            scope=pb.Scope(all=True), reason="pause_fleet benchmark", ticket="BENCH-1"
        )
        return self._ic.create_hold(request)

    def resume(self, hold_id: str) -> int:
        """Two people: the incident commander asks, the approver approves; the new epoch."""
        asked = self._ic.request_resume(
            pb.RequestResumeRequest(
                hold_id=hold_id, reason="pause_fleet benchmark: next round", ticket="BENCH-1"
            )
        )
        approved = self._approver.approve_resume(
            pb.DecideResumeRequest(request_id=asked.request.id, revision=asked.request.revision)
        )
        return int(approved.epoch)

    def agents(self) -> list[pb.AgentRecord]:
        return list(self._ic.list_agents(pb.ListAgentsRequest()))

    def acks(self) -> list[tuple[float, int]]:
        """(acked_at, applied epoch) per agent; acked_at 0.0 if it never acked."""
        return [(r.acked_at.ToNanoseconds() / 1e9, r.applied_epoch) for r in self.agents()]

    def agent_certificates_issued(self) -> list[float]:
        """When each agent certificate was issued (server clock), oldest first."""
        response = self._ic.with_timeout(60).list_certificates(pb.ListCertificatesRequest())
        return sorted(
            c.issued_at.ToNanoseconds() / 1e9 for c in response.certificates if c.role == "agent"
        )


def by_state(status: pb.GetStatusResponse) -> dict[str, int]:
    return {c.state: c.count for c in status.by_state if c.count}


def poll(
    op: Operator,
    what: str,
    check: Callable[[pb.GetStatusResponse], bool],
    *,
    since: float,
    timeout: float,
    interval: float,
) -> float:
    """Poll GetStatus until ``check`` holds; seconds from ``since`` (wall clock) to that answer.

    Failed calls count as "not yet": during a reconnect storm the server answers
    some calls with CANCELLED or UNAVAILABLE, as the agents see too.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            status = op.status()
        except KillswitchError as exc:
            last = f"error {exc}"
        else:
            if check(status):
                return time.time() - since
            last = f"total {status.total}, settled {status.settled}, {by_state(status)}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last: {last}")
        time.sleep(interval)


def wait_answering(op: Operator, server: Child, timeout: float) -> None:
    """Until ``server`` answers GetStatus; its log if it exits first."""
    deadline = time.monotonic() + timeout
    while not op.answers():
        if not server.alive():
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not answer within {timeout:g}s")
        time.sleep(0.02)
