"""Hypothesis strategies: requests that must be refused, garbage, and protobuf-shaped bytes."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from killswitch.v1 import killswitch_pb2 as pb

from tests.malformed.calls import APPROVER
from tests.malformed.calls import AUTHORIZE_UPLOAD
from tests.malformed.calls import CONNECT
from tests.malformed.calls import EMPLOYEE
from tests.malformed.calls import FUZZ_AGENT
from tests.malformed.calls import GOOD
from tests.malformed.calls import IC
from tests.malformed.calls import INGEST
from tests.malformed.calls import KNOWN_SUBJECTS
from tests.malformed.calls import LAPTOP
from tests.malformed.calls import NOBODY
from tests.malformed.calls import OPERATOR
from tests.malformed.calls import SELF_SERVICE
from tests.malformed.fleet import Fleet

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT64_MAX = 2**63 - 1
# What SQLite can store; beyond it see test_nack_epoch_beyond_int64_... and test_ack_counters_...
STORABLE = st.integers(0, INT64_MAX)

# ------------------------------------------------------------------ strategies

WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2003\u2028\u2029\u3000"
utf8 = st.characters(codec="utf-8")
any_text = st.text(utf8, max_size=40)
control_text = st.text(st.characters(codec="utf-8", categories=["Cc"]), min_size=1, max_size=20)
solid = st.characters(codec="utf-8").filter(lambda c: not c.isspace())
solid_text = st.text(solid, min_size=1, max_size=30)
blank = st.text(st.sampled_from(WHITESPACE), max_size=30)
weird_text = st.one_of(
    any_text,
    control_text,
    blank,
    st.text(utf8, min_size=200, max_size=3000),
    st.sampled_from(["\x00", "a\x00b", "a/b", "../etc", "🙂", "é", "-x", ".", "NaN", "-1"]),
)
# Collapses to more than 500 characters, however the whitespace falls.
oversized_reason = st.builds(
    lambda head, pad, tail: head + pad + tail,
    st.text(solid, min_size=501, max_size=1500),
    blank,
    any_text,
)
invalid_reason = st.one_of(blank, oversized_reason)
invalid_ticket = st.one_of(
    st.builds(
        lambda a, ws, b: a + ws + b,
        solid_text,
        st.text(st.sampled_from(WHITESPACE), min_size=1),
        solid_text,
    ),
    st.text(solid, min_size=101, max_size=400),
)
valid_reason = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=50)
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
good_key = st.text(st.sampled_from(ALNUM), min_size=1, max_size=20).filter(lambda k: k != "owner")
good_value = st.text(st.sampled_from(ALNUM), min_size=1, max_size=20)
# Keys and values no label syntax accepts: a separator ("/" is fine inside a key), a bad
# first character, too long.
bad_label_text = st.one_of(
    st.just(""),
    st.builds(
        lambda a, sep, b: a + sep + b, good_key, st.sampled_from(list(" =,;:\x00\né🙂")), good_key
    ),
    st.builds(lambda sep, a: sep + a, st.sampled_from(list("-._/ ")), good_key),
    st.text(st.sampled_from(ALNUM), min_size=64, max_size=300),
)
bad_agent_id = st.one_of(
    st.just(""),
    st.builds(
        lambda a, sep, b: a + sep + b,
        good_key,
        st.sampled_from(list(" /\\,=\x00\n\t!é🙂")),
        good_key,
    ),
    st.builds(lambda sep, a: sep + a, st.sampled_from(list("-._:@ ")), good_key),
    st.text(st.sampled_from(ALNUM), min_size=129, max_size=400),
    control_text,
)
good_agent_id = st.builds(lambda n: f"fz-x-{n}", st.integers(0, 10**6))
label_maps = st.dictionaries(
    st.one_of(good_key, bad_label_text), st.one_of(good_value, bad_label_text), max_size=40
)


@st.composite
def bad_labels(draw: st.DrawFn) -> dict[str, str]:
    """At least one bad pair, or more than 32 pairs."""
    if draw(st.booleans()):
        return {f"k{n}": "v" for n in range(draw(st.integers(33, 200)))}
    labels = draw(st.dictionaries(good_key, good_value, max_size=5))
    key = draw(st.one_of(good_key, bad_label_text))
    value = draw(bad_label_text) if key in labels or _fits_label(key) else draw(good_value)
    labels[key] = value
    return labels


def _fits_label(text: str) -> bool:
    return bool(text) and text.isascii() and text.isalnum() and len(text) <= 20


@st.composite
def huge_id_lists(draw: st.DrawFn, *, valid: bool) -> list[str]:
    """Up to ~40 KiB of ids; with ``valid`` False at least one of them is bad."""
    ids = [f"fz-h-{n:06d}" for n in range(draw(st.sampled_from([0, 1, 10, 1000, 3000])))]
    if not valid:
        ids.insert(draw(st.integers(0, len(ids))), draw(bad_agent_id))
    return ids


valid_scope = st.one_of(
    st.just(pb.Scope(all=True)),
    st.builds(
        lambda m: pb.Scope(selector=pb.Selector(match_labels=m)),
        st.dictionaries(good_key, good_value, min_size=1, max_size=3),
    ),
    st.builds(
        lambda ids: pb.Scope(agents=pb.AgentIds(ids=ids)),
        st.lists(good_agent_id, min_size=1, max_size=5),
    ),
)
invalid_scope = st.one_of(
    st.just(pb.Scope()),
    st.just(pb.Scope(all=False)),
    st.just(pb.Scope(selector=pb.Selector())),
    st.just(pb.Scope(agents=pb.AgentIds())),
    st.builds(lambda m: pb.Scope(selector=pb.Selector(match_labels=m)), bad_labels()),
    st.builds(lambda ids: pb.Scope(agents=pb.AgentIds(ids=ids)), huge_id_lists(valid=False)),
)


def create_hold(scope: pb.Scope, reason: str, ticket: str, keep: bool) -> pb.CreateHoldRequest:
    return pb.CreateHoldRequest(scope=scope, reason=reason, ticket=ticket, keep_spool=keep)


# Every one of these must be refused: a bad scope, or a bad reason, or a bad ticket.
invalid_create_hold = st.one_of(
    st.builds(
        create_hold, invalid_scope, st.one_of(valid_reason, weird_text), weird_text, st.booleans()
    ),
    st.builds(create_hold, valid_scope, invalid_reason, weird_text, st.booleans()),
    st.builds(
        create_hold,
        valid_scope,
        st.one_of(valid_reason, control_text),
        invalid_ticket,
        st.booleans(),
    ),
)

finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 604800.0, 604800.5, 2592000.5, 1e308]),
)
# RequestResume expiry and CreateEnrollToken ttl: 0 means "the default", so never 0.
bad_expiry = st.one_of(
    st.floats(max_value=-1e-9),
    st.floats(min_value=604800.0, exclude_min=True),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
bad_ttl = st.one_of(
    st.floats(max_value=-1e-9),
    st.floats(min_value=2592000.0, exclude_min=True),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)

OperatorCall = tuple[str, str, Message]  # identity, path, request


def not_subject(text: str) -> bool:
    return text.strip() not in KNOWN_SUBJECTS


@st.composite
def operator_mutations(draw: st.DrawFn, fleet: Fleet) -> OperatorCall:
    """Mutating Operator calls that must all be refused."""
    unknown = st.one_of(weird_text, st.builds(lambda s: f"hold-{s}", any_text))
    kind = draw(
        st.sampled_from(
            [
                *("CreateHold", "RequestResume", "EditResumeRequest", "ApproveResume"),
                *("DenyResume", "ExpectAgents", "AcknowledgeViolation", "CreateEnrollToken"),
                "RevokeCertificates",
            ]
        )
    )
    identity = IC
    message: Message
    if kind == "CreateHold":
        message = draw(invalid_create_hold)
    elif kind == "RequestResume":
        which = draw(st.sampled_from(["unknown", "incident", "opt_out", "spare"]))
        request = pb.RequestResumeRequest(
            hold_id={
                "unknown": draw(unknown),
                "incident": fleet.incident_hold,  # already has an open request
                "opt_out": fleet.opt_out_hold,  # only its owner lifts it
                "spare": fleet.spare_hold,
            }[which],
            reason=draw(st.one_of(valid_reason, weird_text)),
            ticket=draw(st.one_of(st.just(""), weird_text)),
            expires_in_seconds=draw(finite_or_not),
            for_runbook=draw(st.booleans()),
        )
        if which == "spare":  # nothing else stops it: one field must be bad
            bad = draw(st.sampled_from(["reason", "ticket", "expiry"]))
            if bad == "reason":
                request.reason = draw(invalid_reason)
            elif bad == "ticket":
                request.ticket = draw(invalid_ticket)
            else:
                request.expires_in_seconds = draw(bad_expiry)
        message = request
    elif kind == "EditResumeRequest":
        if draw(st.booleans()):
            message = pb.EditResumeRequestRequest(
                request_id=draw(unknown), reason=draw(weird_text), ticket=draw(weird_text)
            )
        else:  # the real request: every edit of it must be invalid
            reason, ticket = draw(
                st.one_of(
                    st.tuples(invalid_reason.filter(bool), st.one_of(st.just(""), weird_text)),
                    st.tuples(st.just(""), invalid_ticket),
                    st.tuples(blank, blank),
                )
            )
            message = pb.EditResumeRequestRequest(
                request_id=fleet.request_id, reason=reason, ticket=ticket
            )
    elif kind in ("ApproveResume", "DenyResume"):
        identity = draw(st.sampled_from([IC, APPROVER]))
        real = draw(st.booleans())
        message = pb.DecideResumeRequest(
            request_id=fleet.request_id if real else draw(unknown),
            # The request is at revision 1 and 0 means "whatever it is now": never those.
            revision=draw(st.integers(2, 2**32 - 1)) if real else draw(UINT32),
            note=draw(st.one_of(st.just(""), blank, weird_text)),
        )
    elif kind == "ExpectAgents":
        agents = [pb.ExpectedAgent(agent_id=a) for a in draw(huge_id_lists(valid=True))]
        broken = draw(
            st.one_of(
                st.builds(pb.ExpectedAgent, agent_id=bad_agent_id, labels=label_maps),
                st.builds(pb.ExpectedAgent, agent_id=good_agent_id, labels=bad_labels()),
            )
        )
        agents.insert(draw(st.integers(0, len(agents))), broken)
        message = pb.ExpectAgentsRequest(agents=agents)
    elif kind == "AcknowledgeViolation":
        agent = draw(st.one_of(st.sampled_from([GOOD, LAPTOP, NOBODY]), bad_agent_id, weird_text))
        message = pb.AcknowledgeViolationRequest(agent_id=agent, note=draw(weird_text))
    elif kind == "CreateEnrollToken":
        message = draw(
            st.one_of(
                st.builds(
                    pb.CreateEnrollTokenRequest,
                    uses=st.integers(100_001, 2**32 - 1),
                    ttl_seconds=finite_or_not,
                ),
                st.builds(pb.CreateEnrollTokenRequest, uses=UINT32, ttl_seconds=bad_ttl),
            )
        )
    else:
        subject = draw(st.one_of(weird_text, bad_agent_id).filter(not_subject))
        message = pb.RevokeCertificatesRequest(subject_or_serial=subject, reason=draw(weird_text))
    return identity, OPERATOR + kind, message


agent_filters = st.builds(
    pb.AgentFilter,
    state=st.one_of(
        st.just(""),
        st.sampled_from(["CAPTURING", "capturing", "Overdue", "NEVER_SEEN", "CAPTURING ", "*"]),
        weird_text,
    ),
    match_labels=label_maps,
    hold_id=st.one_of(st.just(""), weird_text),
)


@st.composite
def operator_reads(draw: st.DrawFn, fleet: Fleet) -> OperatorCall:
    kind = draw(
        st.sampled_from(
            [
                *("GetStatus", "ListAgents", "ListAudit", "ListResumeRequests"),
                *("ListHolds", "ListCertificates"),
            ]
        )
    )
    message: Message
    if kind == "GetStatus":
        message = pb.GetStatusRequest(filter=draw(agent_filters), unsettled_limit=draw(UINT32))
        if draw(st.booleans()):
            message.filter.hold_id = draw(
                st.sampled_from([fleet.incident_hold, fleet.opt_out_hold])
            )
    elif kind == "ListAgents":
        message = pb.ListAgentsRequest(filter=draw(agent_filters))
    elif kind == "ListAudit":
        message = pb.ListAuditRequest(
            after_seq=draw(st.one_of(UINT64, st.sampled_from([INT64_MAX, 2**63, 2**64 - 1]))),
            limit=draw(UINT32),
        )
    elif kind == "ListResumeRequests":
        message = pb.ListResumeRequestsRequest(
            request_id=draw(st.one_of(st.just(fleet.request_id), weird_text)),
            include_closed=draw(st.booleans()),
        )
    elif kind == "ListHolds":
        message = pb.ListHoldsRequest()
    else:
        message = pb.ListCertificatesRequest()
    return IC, OPERATOR + kind, message


@st.composite
def self_service_calls(draw: st.DrawFn) -> OperatorCall:
    kind = draw(st.sampled_from(["OptOut", "OptIn", "ListMyLaptops"]))
    laptop = st.one_of(
        st.sampled_from([LAPTOP, GOOD, FUZZ_AGENT, NOBODY]), bad_agent_id, weird_text
    )
    message: Message
    if kind == "OptOut":  # LAPTOP is already opted out
        message = pb.OptOutRequest(
            agent_id=draw(laptop), reason=draw(st.one_of(weird_text, invalid_reason))
        )
    elif kind == "OptIn":  # ... and opting it back in would work: never LAPTOP
        message = pb.OptInRequest(agent_id=draw(laptop.filter(lambda a: a.strip() != LAPTOP)))
    else:
        message = pb.ListMyLaptopsRequest()
    return EMPLOYEE, SELF_SERVICE + kind, message


def ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


in_range_timestamp = st.builds(
    ts, st.integers(-62135596800, 253402300799), st.integers(0, 999_999_999)
)
out_of_range_timestamp = st.one_of(
    st.builds(ts, st.integers(253402300800, INT64_MAX)),
    st.builds(ts, st.integers(-(2**63), -62135596801)),
    st.builds(ts, st.just(0), st.integers(-(2**31), -1)),
    st.builds(ts, st.just(0), st.integers(10**9, 2**31 - 1)),
)
timestamps = st.one_of(in_range_timestamp, out_of_range_timestamp)
enum_value = st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
channels = st.lists(
    st.builds(
        pb.Channel,
        name=st.one_of(st.sampled_from(["keyboard", "screen"]), weird_text),
        state=enum_value,
    ),
    max_size=5,
)


def capture_report(events: int, spool: int, last: Timestamp | None) -> pb.CaptureReport:
    return pb.CaptureReport(events_captured_total=events, spool_events=spool, last_event_at=last)


reports = st.builds(capture_report, UINT64, UINT64, st.none() | timestamps)


claimed_ids = st.one_of(
    st.just(FUZZ_AGENT),
    st.sampled_from(
        [GOOD, f"{FUZZ_AGENT}\x00", f" {FUZZ_AGENT}", FUZZ_AGENT.upper(), f"{FUZZ_AGENT}/x"]
    ),
    bad_agent_id,
    weird_text,
)


def body(**fields: Any) -> pb.AgentMessage:
    return pb.AgentMessage(**fields)


# Half of the streams get past Hello (this agent, good labels), to reach what follows.
hellos = st.builds(
    body,
    hello=st.one_of(
        st.builds(
            pb.Hello,
            agent_id=st.just(FUZZ_AGENT),
            labels=st.dictionaries(good_key, good_value, max_size=5),
            agent_version=weird_text,
            last_applied_epoch=UINT64,
            channels=channels,
            report=reports,
        ),
        st.builds(
            pb.Hello,
            agent_id=claimed_ids,
            labels=label_maps,
            agent_version=weird_text,
            last_applied_epoch=UINT64,
            channels=channels,
            report=reports,
        ),
    ),
)
after_hello = st.one_of(
    st.builds(
        body,
        ack=st.builds(
            pb.Ack,
            epoch=st.one_of(st.integers(0, 10), UINT64),
            mode=enum_value,
            channels=channels,
            report=reports,
            purged_events=STORABLE,
            quarantined_events=STORABLE,
        ),
    ),
    st.builds(body, nack=st.builds(pb.Nack, epoch=STORABLE, reason=weird_text)),
    st.builds(
        body,
        heartbeat=st.builds(pb.Heartbeat, applied_epoch=UINT64, channels=channels, report=reports),
    ),
    st.builds(body, lease_request=st.builds(pb.LeaseRequest, request_id=UINT64)),
    st.just(pb.AgentMessage()),
    hellos,
)


@st.composite
def agent_streams(draw: st.DrawFn) -> list[pb.AgentMessage]:
    """Mostly a Hello first, as agents do; then anything."""
    first = draw(hellos if draw(st.integers(0, 3)) else after_hello)
    return [first, *draw(st.lists(after_hello, max_size=4))]


upload_requests = st.builds(
    lambda agent, first, last, count: pb.AuthorizeUploadRequest(
        agent_id=agent, first_event_at=first, last_event_at=last, event_count=count
    ),
    st.one_of(st.just(FUZZ_AGENT), claimed_ids),
    st.none() | timestamps,
    st.none() | timestamps,
    UINT64,
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Protobuf-shaped bytes: known and unknown field numbers, any wire type, odd lengths."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        number = draw(st.one_of(st.integers(1, 8), st.integers(1, 2**29 - 1)))
        wire_type = draw(st.sampled_from([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7]))
        out += varint(number << 3 | wire_type)
        if wire_type == 0:
            out += varint(draw(st.one_of(UINT64, st.integers(2**64, 2**70))))
        elif wire_type == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire_type == 2:
            payload = draw(
                st.one_of(
                    st.binary(max_size=64),
                    any_text.map(str.encode),
                    wire_messages(depth + 1) if depth < 2 else st.binary(max_size=8),
                )
            )
            length = len(payload) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 1000]))
            out += varint(max(length, 0)) + payload
    return bytes(out)


# Methods random bytes may reach: parsing random bytes into a request these accept,
# and that changes anything, needs an exact existing id (or cannot happen at all).
# Left out: ExpectAgents, CreateEnrollToken and RevokeCertificates (an empty or tiny
# request can be valid and change state); CreateHold takes only unstructured bytes.
RAW_TARGETS: list[tuple[str, str]] = [
    *((IC, OPERATOR + m) for m in ["ListHolds", "GetStatus", "ListAgents", "ListAudit"]),
    *((IC, OPERATOR + m) for m in ["ListResumeRequests", "ListCertificates"]),
    *((IC, OPERATOR + m) for m in ["RequestResume", "EditResumeRequest", "ApproveResume"]),
    *((IC, OPERATOR + m) for m in ["DenyResume", "AcknowledgeViolation"]),
    (APPROVER, OPERATOR + "ApproveResume"),
    (APPROVER, OPERATOR + "DenyResume"),
    *((EMPLOYEE, SELF_SERVICE + m) for m in ["ListMyLaptops", "OptOut", "OptIn"]),
    (INGEST, AUTHORIZE_UPLOAD),
    (FUZZ_AGENT, CONNECT),
]
