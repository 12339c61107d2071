"""Reference capture agent library and fleet simulator for the kill-switch protocol.

``Agent`` runs one agent's control stream; ``CaptureEngine`` stands in for the
real capture channels and captures only while the ``Lease`` holds, on a clock that
counts sleep (``PLATFORM_CLOCK``). Unknown state means off: nothing captures before
the first lease grant. ``GroundTruth`` counts
what a simulated agent really captured, apart from the code that gates it.
"""

from agent_stub.agent import Agent
from agent_stub.backoff import Backoff
from agent_stub.capture import CHANNELS, CaptureEngine
from agent_stub.clock import PLATFORM_CLOCK, NoSleepClock, platform_clock
from agent_stub.config import AgentConfig, Fault, Tuning
from agent_stub.lease import Lease
from agent_stub.truth import GroundTruth

__all__ = [
    "CHANNELS",
    "PLATFORM_CLOCK",
    "Agent",
    "AgentConfig",
    "Backoff",
    "CaptureEngine",
    "Fault",
    "GroundTruth",
    "Lease",
    "NoSleepClock",
    "Tuning",
    "platform_clock",
]
