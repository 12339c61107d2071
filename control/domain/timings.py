"""The fleet's protocol timings, by default: what compliance verdicts and leases rest on.

Defined once here because the domain's policies, the control plane and the server's
settings (``control.settings``) all default to them. The reference agent cannot import
``control``: it keeps its own copy of the lease TTL (``agent_stub.config``), and
``tests/test_settings.py`` holds the two equal.
"""

from __future__ import annotations

# An agent that has not acknowledged its directive this long after it was sent is OVERDUE.
DEFAULT_ACK_DEADLINE_SECONDS = 30.0
# The heartbeat interval the server asks agents for.
DEFAULT_HEARTBEAT_SECONDS = 10.0
# A capture lease's length; agents renew at a third of it.
DEFAULT_LEASE_TTL_SECONDS = 60.0
# How long after a pause ack an unchanged capture report proves the stop: two of the
# reference agent's 1 s capture ticks, in each of which a channel still capturing would
# have moved its counters. The agent sends that report a little after this
# (agent_stub.config.PROOF_REPORT_DELAY_SECONDS), so a pause is verified in seconds; every
# later heartbeat is checked the same way, so a capture that resumes is still caught.
# (One heartbeat interval, 10 s, until 2026-12-06: verification waited on the next beat.)
DEFAULT_PROOF_WINDOW_SECONDS = 2.0
