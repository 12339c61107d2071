"""Kill-switch control plane: pause capture across a fleet and prove that it stopped.

Public face: the exception hierarchy, and the server configuration used by the
``killswitch serve`` command. Everything else lives in small private modules.
"""

from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import StoreError

__version__ = "0.1.0"

__all__ = ["Conflict", "InvalidInput", "KillswitchError", "NotFound", "StoreError", "__version__"]
