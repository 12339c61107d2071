"""The ``killswitch`` command line: one module per command group, assembled by ``app``.

``app`` builds the parser and holds the one error boundary; ``options`` the shared
flags and the client they set up (``control.client``); ``output`` the tables and JSON;
``exit_codes`` what scripts branch on. Commands that work without a server (``init``,
``certs issue``, ``audit verify --data-dir``) reach the database through
``control.admin``: nothing here imports ``control.store``.
"""

from __future__ import annotations

from control.cli.app import build_parser
from control.cli.app import main

__all__ = ["build_parser", "main"]
