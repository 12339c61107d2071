"""The agent's copy of the wire rules the control server defines in ``control/wire.py``.

The agent must not import the server's package (it ships alone), so it repeats the
header name and the port rule; ``tests/test_wire.py`` fails if the copies differ.
"""

from __future__ import annotations

# An insecure (loopback, development) server takes the caller's identity from this
# metadata header, as ``NAME:ROLE``.
INSECURE_IDENTITY_HEADER = "x-killswitch-as"


def enrolment_port(control_port: int) -> int:
    """Agents enrol on the port after the control port unless told otherwise."""
    return control_port + 1
