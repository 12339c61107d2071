"""Hand-picked malformed requests, one expected status each, and the bugs fuzzing found.

Each case names the smallest reproduction: undecodable bodies answered UNKNOWN,
out-of-range timestamps and counters, refusals echoing unbounded input; refusals
are audited under the caller's name.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.identity import Role
from tests.conftest import agent_identity
from tests.malformed.calls import ALL
from tests.malformed.calls import APPROVER
from tests.malformed.calls import AUTHORIZE_UPLOAD
from tests.malformed.calls import CONFLICT
from tests.malformed.calls import CONNECT
from tests.malformed.calls import DENIED
from tests.malformed.calls import EMPLOYEE
from tests.malformed.calls import FUZZ_AGENT
from tests.malformed.calls import GOOD
from tests.malformed.calls import IC
from tests.malformed.calls import INGEST
from tests.malformed.calls import INVALID
from tests.malformed.calls import LAPTOP
from tests.malformed.calls import NOT_FOUND
from tests.malformed.calls import OK
from tests.malformed.calls import OPERATOR
from tests.malformed.calls import SELF_SERVICE
from tests.malformed.calls import TOO_BIG
from tests.malformed.calls import bidi
from tests.malformed.calls import call
from tests.malformed.calls import check
from tests.malformed.calls import secure_channel
from tests.malformed.calls import unary
from tests.malformed.fleet import Fleet
from tests.malformed.strategies import INT64_MAX
from tests.malformed.strategies import ts

# One worker runs every malformed-input module: they share the session's fleet
# (tests/malformed/conftest.py), which each worker would otherwise build for itself.
pytestmark = pytest.mark.xdist_group("malformed")


def request_class(path: str) -> Callable[..., Message]:
    service, method = path.removeprefix("/killswitch.v1.").split("/")
    descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    cls: Callable[..., Message] = getattr(pb, descriptor.input_type.name)
    return cls


@dataclass(frozen=True)
class Case:
    """One request and the status it must get; ``fields`` may name a fixture object."""

    id: str
    identity: str
    path: str
    expect: grpc.StatusCode
    fields: dict[str, Any]
    raw: bytes | None = None

    def request(self, fleet: Fleet) -> Message | bytes:
        if self.raw is not None:
            return self.raw
        fields = {k: v(fleet) if callable(v) else v for k, v in self.fields.items()}
        return request_class(self.path)(**fields)

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


def ic(method: str, case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    return Case(case_id, IC, OPERATOR + method, expect, fields)


def approver(method: str, case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    return Case(case_id, APPROVER, OPERATOR + method, expect, fields)


def employee(method: str, case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    return Case(case_id, EMPLOYEE, SELF_SERVICE + method, expect, fields)


def upload(case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    return Case(case_id, INGEST, AUTHORIZE_UPLOAD, expect, fields)


def stream(case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    """A Connect stream whose one message is an AgentMessage with these fields."""
    return Case(case_id, FUZZ_AGENT, CONNECT, expect, fields)


def hold(case_id: str, expect: grpc.StatusCode, **fields: Any) -> Case:
    return ic("CreateHold", case_id, expect, **{"scope": ALL, "reason": "fuzz", **fields})


def raw_case(identity: str, path: str, case_id: str, expect: grpc.StatusCode, body: bytes) -> Case:
    return Case(case_id, identity, path, expect, {}, body)


def selector(labels: dict[str, str]) -> pb.Scope:
    return pb.Scope(selector=pb.Selector(match_labels=labels))


def agents(*ids: str) -> pb.Scope:
    return pb.Scope(agents=pb.AgentIds(ids=list(ids)))


def hello_as(agent_id: str, **fields: Any) -> pb.Hello:
    return pb.Hello(agent_id=agent_id, **fields)


INCIDENT = attrgetter("incident_hold")
SPARE = attrgetter("spare_hold")
OPT_OUT = attrgetter("opt_out_hold")
REQUEST = attrgetter("request_id")
MANY_IDS = [f"fz-h-{n:06d}" for n in range(3500)]  # ~42 KiB: under the message cap
TOO_MANY_IDS = [f"fz-h-{n:06d}" for n in range(6000)]  # ~72 KiB: over it
MANY_LABELS = {f"k{n}": "v" for n in range(33)}

CASES = [
    hold("hold-no-scope", INVALID, scope=pb.Scope()),
    hold("hold-all-false", INVALID, scope=pb.Scope(all=False)),
    hold("hold-empty-reason", INVALID, reason=""),
    hold("hold-blank-reason", INVALID, reason=" \t\n\r\u3000\x1c\x85"),
    hold("hold-501-char-reason", INVALID, reason="x" * 501),
    hold("hold-spaced-ticket", INVALID, ticket="INC 42"),
    hold("hold-tab-ticket", INVALID, ticket="INC\t42"),
    hold("hold-101-char-ticket", INVALID, ticket="T" * 101),
    hold("hold-empty-selector", INVALID, scope=selector({})),
    hold("hold-selector-space-key", INVALID, scope=selector({"a b": "c"})),
    hold("hold-selector-empty-key", INVALID, scope=selector({"": "c"})),
    hold("hold-selector-empty-value", INVALID, scope=selector({"k": ""})),
    hold("hold-selector-comma-key", INVALID, scope=selector({"k,j": "v"})),
    hold("hold-selector-equals-value", INVALID, scope=selector({"k": "v=w"})),
    hold("hold-selector-unicode-key", INVALID, scope=selector({"é": "v"})),
    hold("hold-selector-nul-value", INVALID, scope=selector({"k": "v\x00"})),
    hold("hold-selector-64-char-key", INVALID, scope=selector({"k" * 64: "v"})),
    hold("hold-selector-33-labels", INVALID, scope=selector(MANY_LABELS)),
    hold("hold-no-agents", INVALID, scope=agents()),
    hold("hold-agent-slash", INVALID, scope=agents("a/b")),
    hold("hold-agent-nul", INVALID, scope=agents("a\x00b")),
    hold("hold-agent-unicode", INVALID, scope=agents("laptöp")),
    hold("hold-agent-leading-dash", INVALID, scope=agents("-laptop")),
    hold("hold-agent-129-chars", INVALID, scope=agents("a" * 129)),
    hold("hold-agent-blank-among-good", INVALID, scope=agents("fz-a", " ")),
    hold("hold-3500-agents-one-bad", INVALID, scope=agents(*MANY_IDS, "bad id")),
    hold("hold-6000-agents", TOO_BIG, scope=agents(*TOO_MANY_IDS)),
    hold("hold-70-KiB-reason", TOO_BIG, reason="x" * 70 * 1024),
    ic("RequestResume", "resume-no-hold", INVALID, reason="x"),
    ic("RequestResume", "resume-unknown-hold", NOT_FOUND, hold_id="hold-nope", reason="x"),
    ic("RequestResume", "resume-nul-hold", NOT_FOUND, hold_id="\x00/../", reason="x"),
    ic("RequestResume", "resume-opt-out", DENIED, hold_id=OPT_OUT, reason="x"),
    ic("RequestResume", "resume-twice", CONFLICT, hold_id=INCIDENT, reason="x"),
    ic("RequestResume", "resume-nan-expiry", INVALID, hold_id=SPARE, expires_in_seconds=math.nan),
    ic("RequestResume", "resume-inf-expiry", INVALID, hold_id=SPARE, expires_in_seconds=math.inf),
    ic("RequestResume", "resume-negative-expiry", INVALID, hold_id=SPARE, expires_in_seconds=-1),
    ic("RequestResume", "resume-8-day-expiry", INVALID, hold_id=SPARE, expires_in_seconds=8e5),
    ic("RequestResume", "resume-blank-reason", INVALID, hold_id=SPARE, reason="  "),
    ic("RequestResume", "resume-spaced-ticket", INVALID, hold_id=SPARE, reason="x", ticket="a b"),
    ic("EditResumeRequest", "edit-nothing", INVALID, request_id=REQUEST, reason=" ", ticket="\t"),
    ic("EditResumeRequest", "edit-unknown", NOT_FOUND, request_id="resume-nope", reason="x"),
    ic("EditResumeRequest", "edit-long-reason", INVALID, request_id=REQUEST, reason="x" * 600),
    ic("EditResumeRequest", "edit-spaced-ticket", INVALID, request_id=REQUEST, ticket="a b"),
    ic("ApproveResume", "approve-as-ic", DENIED, request_id=REQUEST),
    approver("ApproveResume", "approve-no-id", INVALID),
    approver("ApproveResume", "approve-unknown", NOT_FOUND, request_id="resume-\x00"),
    approver("ApproveResume", "approve-stale", CONFLICT, request_id=REQUEST, revision=2**32 - 1),
    approver("DenyResume", "deny-without-note", INVALID, request_id=REQUEST, note=" \n"),
    approver("DenyResume", "deny-stale", CONFLICT, request_id=REQUEST, revision=7, note="x"),
    ic("ListResumeRequests", "requests-unknown", NOT_FOUND, request_id="nope\x00"),
    ic("ListResumeRequests", "requests-blank-id", OK, request_id="  "),
    ic("GetStatus", "status-unknown-state", INVALID, filter=pb.AgentFilter(state="bogus")),
    ic("GetStatus", "status-nul-state", INVALID, filter=pb.AgentFilter(state="\x00")),
    ic("GetStatus", "status-lowercase-state", OK, filter=pb.AgentFilter(state="capturing")),
    ic("GetStatus", "status-bad-label", INVALID, filter=pb.AgentFilter(match_labels={"a": "b c"})),
    ic("GetStatus", "status-unknown-hold", NOT_FOUND, filter=pb.AgentFilter(hold_id="hold-no")),
    ic("GetStatus", "status-max-unsettled", OK, unsettled_limit=2**32 - 1),
    ic("ListAgents", "agents-unknown-state", INVALID, filter=pb.AgentFilter(state="nope")),
    ic("ListAgents", "agents-unknown-hold", NOT_FOUND, filter=pb.AgentFilter(hold_id="\x00")),
    ic("ListAgents", "agents-bad-label", INVALID, filter=pb.AgentFilter(match_labels={"k": "v v"})),
    ic("ListAudit", "audit-max-limit", OK, limit=2**32 - 1),
    ic("ListAudit", "audit-int64-max-seq", OK, after_seq=INT64_MAX),
    ic("ExpectAgents", "expect-slash-id", INVALID, agents=[pb.ExpectedAgent(agent_id="a/b")]),
    ic(
        "ExpectAgents",
        "expect-good-then-bad",
        INVALID,
        agents=[pb.ExpectedAgent(agent_id=i) for i in [*MANY_IDS, "\x00"]],
    ),
    ic(
        "ExpectAgents",
        "expect-bad-label",
        INVALID,
        agents=[pb.ExpectedAgent(agent_id="fz-x", labels={"k": "v v"})],
    ),
    ic(
        "ExpectAgents",
        "expect-33-labels",
        INVALID,
        agents=[pb.ExpectedAgent(agent_id="fz-x", labels=MANY_LABELS)],
    ),
    ic("AcknowledgeViolation", "violation-no-note", INVALID, agent_id=GOOD, note=" "),
    ic("AcknowledgeViolation", "violation-unknown-agent", NOT_FOUND, agent_id="fz-no", note="x"),
    ic("AcknowledgeViolation", "violation-bad-agent", INVALID, agent_id="a/b", note="x"),
    ic("AcknowledgeViolation", "violation-none", CONFLICT, agent_id=GOOD, note="x"),
    ic("CreateEnrollToken", "token-too-many-uses", INVALID, uses=2**32 - 1),
    ic("CreateEnrollToken", "token-negative-ttl", INVALID, ttl_seconds=-1),
    ic("CreateEnrollToken", "token-nan-ttl", INVALID, ttl_seconds=math.nan),
    ic("CreateEnrollToken", "token-inf-ttl", INVALID, ttl_seconds=math.inf),
    ic("CreateEnrollToken", "token-31-day-ttl", INVALID, ttl_seconds=31 * 86400),
    ic("RevokeCertificates", "revoke-nothing", INVALID, subject_or_serial=" \t"),
    ic("RevokeCertificates", "revoke-nobody", NOT_FOUND, subject_or_serial="fz-nobody-at-all"),
    ic("RevokeCertificates", "revoke-nul", NOT_FOUND, subject_or_serial="\x00"),
    employee("OptOut", "opt-out-nothing", INVALID, agent_id=" "),
    employee("OptOut", "opt-out-not-mine", DENIED, agent_id=GOOD),
    employee("OptOut", "opt-out-nul", DENIED, agent_id="a/b\x00"),
    employee("OptOut", "opt-out-twice", CONFLICT, agent_id=LAPTOP, reason="x" * 600),
    employee("OptIn", "opt-in-nothing", INVALID, agent_id=""),
    employee("OptIn", "opt-in-not-mine", DENIED, agent_id=GOOD),
    # Field 99, unknown to the message: skipped, as protobuf says.
    raw_case(
        EMPLOYEE, SELF_SERVICE + "ListMyLaptops", "laptops-unknown-field", OK, b"\x98\x06\x01"
    ),
    # Only the ingest gateway asks, for any agent; an agent may not, even for itself.
    Case("upload-by-an-agent", FUZZ_AGENT, AUTHORIZE_UPLOAD, DENIED, {"agent_id": FUZZ_AGENT}),
    upload("upload-for-nobody", OK),
    upload("upload-max-count", OK, agent_id=FUZZ_AGENT, event_count=2**64 - 1),
    Case(
        "batches-over-the-cap",
        INGEST,
        "/killswitch.v1.Ingest/AuthorizeBatches",
        INVALID,
        {"checks": [pb.BatchCheck(agent_id=FUZZ_AGENT)] * 501},
    ),
    Case(
        "accepted-year-10000",
        INGEST,
        "/killswitch.v1.Ingest/RecordAccepted",
        INVALID,
        {"batches": [pb.AcceptedBatch(agent_id=FUZZ_AGENT, last_event_at=ts(253402300800))]},
    ),
    Case(
        "accepted-by-an-agent",
        FUZZ_AGENT,
        "/killswitch.v1.Ingest/RecordAccepted",
        DENIED,
        {"batches": [pb.AcceptedBatch(agent_id=FUZZ_AGENT, event_count=1)]},
    ),
    stream("stream-ack-first", CONFLICT, ack=pb.Ack(epoch=1)),
    stream("stream-empty-first", CONFLICT),
    stream("stream-claims-another", DENIED, hello=hello_as(GOOD)),
    stream("stream-claims-nul", DENIED, hello=hello_as(FUZZ_AGENT + "\x00")),
    stream("stream-bad-label", INVALID, hello=hello_as(FUZZ_AGENT, labels={"a b": "c"})),
    stream("stream-33-labels", INVALID, hello=hello_as(FUZZ_AGENT, labels=MANY_LABELS)),
]

# The smallest reproduction of each bug the fuzzing found. Refusals used to echo
# unbounded input: over 16 KiB of grpc-message the client reported RESOURCE_EXHAUSTED
# instead of the real error.
BUGGY_CASES = [
    *(
        case.param()
        for case in [
            raw_case(IC, OPERATOR + "CreateHold", "undecodable-hold", INVALID, b"\x0a\x05garbage"),
            raw_case(IC, OPERATOR + "CreateHold", "utf8-invalid-reason", INVALID, b"\x12\x01\xff"),
            raw_case(
                IC, OPERATOR + "ListHolds", "undecodable-list-holds", INVALID, b"\xff\xff\xff"
            ),
            raw_case(FUZZ_AGENT, CONNECT, "undecodable-agent-message", INVALID, b"\x0a\x80"),
        ]
    ),
    ic("ListAudit", "audit-after-2**63", INVALID, after_seq=2**63).param(),
    ic("ListAudit", "audit-after-uint64-max", INVALID, after_seq=2**64 - 1).param(),
    upload(
        "upload-year-10000", INVALID, agent_id=FUZZ_AGENT, last_event_at=ts(253402300800)
    ).param(),
    upload("upload-negative-nanos", INVALID, agent_id=FUZZ_AGENT, first_event_at=ts(0, -1)).param(),
    hold("hold-20-KiB-spaced-ticket", INVALID, ticket="a b" * 7000).param(),
    ic("RequestResume", "resume-20-KiB-hold-id", NOT_FOUND, hold_id="h" * 20_000).param(),
    employee("OptOut", "opt-out-10-KiB-unicode-id", DENIED, agent_id="é" * 5000).param(),
]


@pytest.mark.parametrize("case", [*(c.param() for c in CASES), *BUGGY_CASES])
def test_hand_picked(fleet: Fleet, case: Case) -> None:
    outcome = call(fleet.channels[case.identity], case.path, case.request(fleet))
    check(outcome, case.id)
    assert outcome.code is case.expect, f"{case.id}: expected {case.expect.name}, got {outcome}"
    fleet.tick()


def test_hand_picked_left_everything_as_it_was(fleet: Fleet) -> None:
    fleet.assert_state_unchanged()


def test_stream_errors_after_hello(fleet: Fleet) -> None:
    """Past Hello: unknown modes, empty and repeated messages end the stream cleanly."""
    hello_ = pb.AgentMessage(hello=pb.Hello(agent_id=FUZZ_AGENT))
    cases = {
        "unknown mode": (pb.AgentMessage(ack=pb.Ack(epoch=0, mode=pb.Mode.ValueType(7))), INVALID),
        "negative mode": (
            pb.AgentMessage(ack=pb.Ack(epoch=0, mode=pb.Mode.ValueType(-1))),
            INVALID,
        ),
        "empty message": (pb.AgentMessage(), INVALID),
        "second hello": (hello_, INVALID),
        "future epoch ack": (
            pb.AgentMessage(ack=pb.Ack(epoch=2**64 - 1, mode=pb.MODE_ALLOWED)),
            OK,
        ),
        "unknown channel state": (
            pb.AgentMessage(
                heartbeat=pb.Heartbeat(
                    channels=[pb.Channel(name="\x00", state=pb.ChannelState.ValueType(99))]
                )
            ),
            OK,
        ),
    }
    for what, (message, expect) in cases.items():
        outcome = bidi(fleet.channels[FUZZ_AGENT], CONNECT, [hello_, message])
        check(outcome, what)
        assert outcome.code is expect, f"{what}: {outcome}"
    fleet.assert_state_unchanged()


def test_stream_report_with_a_timestamp_out_of_range(fleet: Fleet) -> None:
    report = pb.CaptureReport()
    report.last_event_at.seconds = 2**62
    beat = pb.AgentMessage(heartbeat=pb.Heartbeat(report=report))
    outcome = bidi(
        fleet.channels[FUZZ_AGENT],
        CONNECT,
        [pb.AgentMessage(hello=pb.Hello(agent_id=FUZZ_AGENT)), beat],
    )
    assert outcome.code is INVALID, outcome


def fresh_channel(fleet: Fleet, name: str, role: Role, where: Path) -> grpc.Channel:
    """A new certificate of the same person: the fuzzing spent its old one's refusal
    budget, past which refusals are audited in aggregate, not one by one."""
    if role is Role.AGENT:
        return secure_channel(fleet.server, agent_identity(fleet.server, name, where))
    return secure_channel(fleet.server, fleet.server.issue(name, role.value, where / name))


def test_refusals_are_audited_with_the_callers_name(fleet: Fleet, tmp_path: Path) -> None:
    marker = f"fz-{uuid.uuid4().hex[:12]}"
    start = fleet.snapshot().audit_head
    fresh = {
        name: fresh_channel(fleet, name, role, tmp_path)
        for name, role in [
            (IC, Role.INCIDENT_COMMANDER),
            (EMPLOYEE, Role.EMPLOYEE),
            (FUZZ_AGENT, Role.AGENT),
        ]
    }
    refused = [
        unary(
            fresh[IC],
            OPERATOR + "CreateHold",
            pb.CreateHoldRequest(scope=ALL, reason="x", ticket=f"{marker} x"),
        ),
        unary(fresh[EMPLOYEE], SELF_SERVICE + "OptOut", pb.OptOutRequest(agent_id=marker)),
        bidi(fresh[FUZZ_AGENT], CONNECT, [pb.AgentMessage(hello=pb.Hello(agent_id=marker))]),
    ]
    for channel in fresh.values():
        channel.close()
    assert [r.code for r in refused] == [INVALID, DENIED, DENIED], refused
    entries = [e for e in fleet.audit_since(start) if marker in e.result]
    assert sorted((e.actor, e.action, e.result.split(":")[0]) for e in entries) == [
        (EMPLOYEE, "SelfService.OptOut", "denied"),
        (FUZZ_AGENT, "AgentControl.Connect", "denied"),
        (IC, "Operator.CreateHold", "failed"),
    ]


def test_undecodable_mutations_are_audited(fleet: Fleet, tmp_path: Path) -> None:
    start = fleet.snapshot().audit_head
    with fresh_channel(fleet, IC, Role.INCIDENT_COMMANDER, tmp_path) as channel:
        outcome = unary(channel, OPERATOR + "CreateHold", b"\x0a\x05garbage")
    assert outcome.code is INVALID, outcome
    assert any(
        e.action == "Operator.CreateHold" and "malformed request" in e.result
        for e in fleet.audit_since(start)
    )
