"""What travels on the wire besides the protobuf messages: header names, port rules, and
how a wire timestamp reads in JSON.

Client and server read these from here, so the two sides cannot drift apart. The agent
(``agent_stub``) never imports ``control``: it keeps its own copy in ``agent_stub/wire_rules.py``,
and ``tests/test_wire.py`` holds the two copies equal.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

# An insecure (loopback, development) server takes the caller's identity from this
# metadata header, as ``NAME:ROLE``: without TLS there is no certificate to read it from.
INSECURE_IDENTITY_HEADER = "x-killswitch-as"

# Trailing metadata on an UNAVAILABLE the server itself sent because its store cannot
# serve the call: the server is reachable, and the message says why it cannot.
STORE_UNAVAILABLE_METADATA = "killswitch-store-unavailable"


def enrolment_port(control_port: int) -> int:
    """Agents enrol on the port after the control port unless told otherwise."""
    return control_port + 1


def iso(ts: Timestamp) -> str | None:
    """ISO 8601 to the millisecond, or None for an unset timestamp: how the CLI's and the
    dashboard's JSON show a time that came over the wire."""
    if not ts.seconds and not ts.nanos:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).isoformat(
        timespec="milliseconds"
    )
