"""Malformed input over the real transport: every refusal is clean, nothing changes, all stays up.

One real ``killswitch serve`` with mTLS for these modules (``conftest.py``).
Hypothesis sends it garbage (random bytes, random protobuf wire data) and structured
requests that must be refused (empty or oversized reasons, tickets with spaces, bad
selectors, odd ids, huge numbers, unknown enum values), as the most privileged
operator, an employee, an approver and an agent (``test_fuzzing.py``). Every answer is
OK or a deliberate refusal with a one-line message; afterwards the holds, the epoch
and the fleet are exactly as before, no refused call left an "ok" audit entry, and a
well-behaved agent has kept its stream the whole time.

The other modules pin the bugs this fuzzing found (undecodable bodies answered
UNKNOWN, out-of-range timestamps and counters, refusals echoing unbounded input, a
soft metadata limit, control characters in reasons), each with its smallest
reproduction: ``test_hand_picked.py``, ``test_transport_limits.py``,
``test_state_bugs.py``.
"""
