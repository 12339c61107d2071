"""The fault suite's fixtures."""

from tests.faults.harness import fleet_of
from tests.faults.private_postgres import private_postgresql

__all__ = ["fleet_of", "private_postgresql"]
