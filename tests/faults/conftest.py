"""The fault suite's fixtures."""

from tests.faults.harness import fleet_of

__all__ = ["fleet_of"]
