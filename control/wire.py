"""What travels on the wire besides the protobuf messages: header names, port rules, and
how a wire timestamp reads in JSON.

Client and server read these from here, so the two sides cannot drift apart. The agent
(``agent_stub``) never imports ``control``: it keeps its own copy in ``agent_stub/wire_rules.py``,
and ``tests/test_wire.py`` holds the two copies equal.
"""

from __future__ import annotations

from datetime import UTC
from datetime import datetime

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
    return _iso(ts.seconds, ts.nanos)


def iso_of_seconds(seconds: float | None) -> str | None:
    """A time the server holds (seconds, or None), shown as ``iso`` shows it once it has
    travelled: through whole nanoseconds, so the dashboard and the CLI agree to the ms."""
    if seconds is None:
        return None
    whole, nanos = divmod(int(seconds * 1e9), 1_000_000_000)
    return _iso(whole, nanos)


def _iso(whole: int, nanos: int) -> str | None:
    if not whole and not nanos:
        return None
    return datetime.fromtimestamp(whole + nanos / 1e9, UTC).isoformat(timespec="milliseconds")
