"""Reference capture agent library for the kill-switch protocol.

``Agent`` runs one agent's control stream; ``CaptureEngine`` stands in for the
real capture channels and captures only while the ``Lease`` holds, on a clock that
counts sleep (``PLATFORM_CLOCK``). Unknown state means off: nothing captures before
the first lease grant. It knows nothing of faults: the fleet simulator
(``simulator``) wraps it to misbehave and to count what it really captured.
"""

from agent_stub.agent import Agent
from agent_stub.backoff import Backoff
from agent_stub.capture import CHANNELS
from agent_stub.capture import CaptureEngine
from agent_stub.clock import PLATFORM_CLOCK
from agent_stub.clock import NoSleepClock
from agent_stub.clock import platform_clock
from agent_stub.config import AgentConfig
from agent_stub.config import Tuning
from agent_stub.lease import Lease
from agent_stub.witness import Witness

__all__ = [
    "CHANNELS",
    "PLATFORM_CLOCK",
    "Agent",
    "AgentConfig",
    "Backoff",
    "CaptureEngine",
    "Lease",
    "NoSleepClock",
    "Tuning",
    "Witness",
    "platform_clock",
]
