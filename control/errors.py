"""One exception hierarchy for the whole control plane.

Adapters translate these into their own vocabulary (gRPC status codes, CLI exit
codes) in one place each, so a user always sees a one-line message.
"""

from __future__ import annotations


class KillswitchError(Exception):
    """Base class: every error the product raises on purpose."""


class InvalidInput(KillswitchError):
    """The request itself is wrong (bad selector, empty reason, ...)."""


class NotFound(KillswitchError):
    """The named object (hold, agent) does not exist."""


class Conflict(KillswitchError):
    """The request is valid but contradicts current state (hold already lifted, ...)."""


class StoreError(KillswitchError):
    """The durable store failed or holds data this version cannot read."""


class PermissionDenied(KillswitchError):
    """The caller's role or identity does not allow this action."""
