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
