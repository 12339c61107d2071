"""Reference capture agent library and fleet simulator for the kill-switch protocol.

``Agent`` runs one agent's control stream; ``CaptureEngine`` stands in for the
real capture channels. Unknown state means off: nothing captures before the
first ALLOWED directive.
"""

from agent_stub.agent import Agent, AgentConfig, Behaviour
from agent_stub.backoff import Backoff
from agent_stub.capture import CHANNELS, CaptureEngine

__all__ = ["CHANNELS", "Agent", "AgentConfig", "Backoff", "Behaviour", "CaptureEngine"]
