"""A failed call becomes one of the project's errors, and the CLI gives each its exit code.

Without a server: a fake ``grpc.RpcError`` per status code, and a client that raises.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
import pytest

from control.cli import app
from control.cli.exit_codes import EXIT_BAD_INPUT
from control.cli.exit_codes import EXIT_FAILED
from control.cli.exit_codes import EXIT_STORE_UNAVAILABLE
from control.cli.exit_codes import EXIT_UNREACHABLE
from control.client import error_from_rpc
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import ServerStoreUnavailable
from control.errors import ServerTimedOut
from control.errors import ServerUnreachable
from control.wire import STORE_UNAVAILABLE_METADATA

ADDRESS = "control.example:50051"


class FailedCall(grpc.RpcError):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


@pytest.mark.parametrize(
    ("call", "kind", "message"),
    [
        (
            FailedCall(
                grpc.StatusCode.UNAVAILABLE, "disk full", ((STORE_UNAVAILABLE_METADATA, "1"),)
            ),
            ServerStoreUnavailable,
            f"the control server at {ADDRESS} cannot do this now: disk full",
        ),
        (
            FailedCall(grpc.StatusCode.UNAVAILABLE, "connection refused\nmore"),
            ServerUnreachable,
            f"cannot reach the control server at {ADDRESS} (connection refused)",
        ),
        (
            FailedCall(grpc.StatusCode.UNAVAILABLE, "SSL handshake failed"),
            ServerUnreachable,
            "(TLS handshake failed: is the identity from this server's CA,",
        ),
        (
            FailedCall(grpc.StatusCode.DEADLINE_EXCEEDED, ""),
            ServerTimedOut,
            f"the control server at {ADDRESS} did not answer in time",
        ),
        (
            FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad selector"),
            InvalidInput,
            "bad selector",
        ),
        (
            FailedCall(grpc.StatusCode.PERMISSION_DENIED, "role sre may not"),
            PermissionDenied,
            "permission denied: role sre may not",
        ),
        (FailedCall(grpc.StatusCode.NOT_FOUND, "unknown hold 'h'"), NotFound, "unknown hold 'h'"),
        (FailedCall(grpc.StatusCode.FAILED_PRECONDITION, "already lifted"), Conflict, "already"),
        (FailedCall(grpc.StatusCode.INTERNAL, ""), KillswitchError, "internal"),
    ],
)
def test_each_status_becomes_one_error_with_one_line(
    call: FailedCall, kind: type[KillswitchError], message: str
) -> None:
    error = error_from_rpc(call, ADDRESS)
    assert type(error) is kind
    assert message in str(error) and "\n" not in str(error)


class RaisingClient:
    def __init__(self, error: KillswitchError) -> None:
        self.error = error

    def get_status(self, request: object) -> object:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ServerStoreUnavailable("cannot do this now: x"), EXIT_STORE_UNAVAILABLE, "cannot do"),
        (ServerTimedOut("did not answer in time"), EXIT_UNREACHABLE, "did not answer in time\n"),
        (ServerUnreachable("cannot reach"), EXIT_UNREACHABLE, "is `killswitch serve` running?"),
        (InvalidInput("bad"), EXIT_BAD_INPUT, "killswitch: error: bad\n"),
        (Conflict("already lifted"), EXIT_FAILED, "killswitch: error: already lifted\n"),
    ],
)
def test_the_cli_gives_each_error_its_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: KillswitchError,
    code: int,
    line: str,
) -> None:
    def connect(args: argparse.Namespace) -> RaisingClient:
        return RaisingClient(error)

    monkeypatch.setattr(app, "connect", connect)
    with pytest.raises(SystemExit) as exited:
        app.main(["status", "--insecure", "--as", "ic-1:incident-commander"])
    assert exited.value.code == code
    assert line in capsys.readouterr().err
