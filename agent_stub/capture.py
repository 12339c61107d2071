"""A stand-in for the real capture channels (keyboard, mouse, screen)."""

from __future__ import annotations

from dataclasses import dataclass, field

CHANNELS = ("keyboard", "mouse", "screen")


class ChannelStuck(Exception):
    """A channel refused to stop (simulated driver failure)."""


@dataclass(slots=True)
class CaptureEngine:
    """Per-channel on/off switches. Starts with everything stopped: unknown means off."""

    stuck_channels: frozenset[str] = frozenset()
    active: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CHANNELS, False))

    def start_all(self) -> None:
        for name in self.active:
            self.active[name] = True

    def stop_all(self) -> None:
        """Stop every channel; raise ``ChannelStuck`` naming any that would not stop."""
        for name in self.active:
            if name not in self.stuck_channels:
                self.active[name] = False
        stuck = sorted(n for n, on in self.active.items() if on)
        if stuck:
            raise ChannelStuck(f"channel(s) {','.join(stuck)} did not stop")

    @property
    def capturing(self) -> bool:
        return any(self.active.values())
