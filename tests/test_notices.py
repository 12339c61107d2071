"""Notices on the laptop: every change of capture state is shown to its owner, with the
reason, the ticket and who decided, by a real reference agent against a real server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_stub.notices import CaptureState
from agent_stub.notices import Notice
from agent_stub.notices import NotifierSpecError
from agent_stub.notices import desktop_command
from agent_stub.notices import notifier_from
from tests.agent_support import enrolling_agent
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import terminate
from tests.conftest import wait_for

NOTICE = Notice(
    agent_id="laptop-1",
    state=CaptureState.PAUSED,
    reason='breach "INC-7" $(rm -rf /)',
    ticket="INC-7",
    decided_by="ic-1",
    epoch=3,
    at=0.0,
)


def notices(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# What the reference_agent fixture hands a test: start(server, cli, *extra, env=None).
StartAgent = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def reference_agent(tmp_path: Path) -> Iterator[StartAgent]:
    """`killswitch-agent run`, enrolled with a join token, its state in tmp_path/state."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        server: ServerProcess, cli: Cli, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (tmp_path / "agent.log").open("ab")
        proc = subprocess.Popen(
            enrolling_agent(
                server, cli, "laptop-1", tmp_path / "state", "--label", "owner=employee-1", *extra
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        terminate(proc)


def state_of(cli: Cli) -> str:
    agent = cli.agents().get("laptop-1")
    return "" if agent is None else str(agent["state"])


@pytest.fixture
def notice_file(
    server: ServerProcess, cli: Cli, reference_agent: StartAgent, tmp_path: Path
) -> Path:
    """Where the reference agent, capturing by now, writes its notices (one JSON a line)."""
    out = tmp_path / "notices.jsonl"
    reference_agent(server, cli, "--notify", f"file:{out}")
    wait_for(lambda: state_of(cli) == "CAPTURING", 30, "the agent capturing")
    return out


def nth_notice(out: Path, number: int, what: str) -> dict[str, Any]:
    """The ``number``th notice (from 1), once exactly that many are written."""
    wait_for(lambda: len(notices(out)) == number, 20, what)
    return notices(out)[number - 1]


def test_every_capture_state_change_is_noticed_with_reason_ticket_and_decider(
    cli: Cli, notice_file: Path
) -> None:
    assert notices(notice_file) == [], "a fresh agent's first ALLOWED is no change to announce"

    hold_id = cli.pause("--all", "--reason", "breach at vendor", "--ticket", "INC-42")
    paused = nth_notice(notice_file, 1, "the pause notice")
    assert paused["state"] == "paused"
    assert paused["agent_id"] == "laptop-1"
    assert "breach at vendor" in paused["reason"]
    assert (paused["ticket"], paused["decided_by"]) == ("INC-42", "ic-1")
    assert paused["text"] == (
        "Capture paused on laptop-1: breach at vendor [INC-42]; decided by ic-1"
    )

    cli.resume(hold_id, "--ticket", "INC-42")
    resumed = nth_notice(notice_file, 2, "the resume notice")
    assert resumed["state"] == "resumed"
    assert resumed["ticket"] == "INC-42"
    assert resumed["decided_by"] == "approver-1"
    assert resumed["reason"] == "the pause (breach at vendor) was lifted"

    cli.as_("employee-1").ok("opt-out", "laptop-1", "--reason", "private call")
    opted_out = nth_notice(notice_file, 3, "the opt-out notice")
    assert opted_out["state"] == "opted out"
    assert "private call" in opted_out["reason"]
    assert opted_out["decided_by"] == "employee-1"


def test_lease_lost_is_noticed_when_the_server_goes_away(
    server: ServerProcess, notice_file: Path
) -> None:
    server.kill9()  # nobody renews the 5 s lease now
    lost = nth_notice(notice_file, 1, "the lease-lost notice")
    assert lost["state"] == "lease lost"
    assert "lease ran out" in lost["reason"]
    assert lost["decided_by"] == "this laptop (fail closed)"


def test_a_failing_notifier_never_stops_the_pause_and_status_shows_the_state(
    server: ServerProcess, cli: Cli, reference_agent: StartAgent, tmp_path: Path
) -> None:
    # A directory that does not exist: every notice fails to be written.
    reference_agent(server, cli, "--notify", f"file:{tmp_path / 'missing' / 'notices'}")
    wait_for(lambda: state_of(cli) == "CAPTURING", 30, "the agent capturing")
    cli.pause("--all", "--reason", "breach at vendor", "--ticket", "INC-42")
    wait_for(lambda: state_of(cli) == "VERIFIED_STOPPED", 20, "the pause verified")
    assert "notice_not_shown" in (tmp_path / "agent.log").read_text()

    status = subprocess.run(
        [str(BIN / "killswitch-agent"), "status", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "capture:      paused" in status
    assert "mode:         PAUSED" in status
    assert "lease:        none held" in status
    assert "breach at vendor" in status
    assert "ticket:       INC-42" in status
    assert "decided by:   ic-1" in status
    as_json = subprocess.run(
        [str(BIN / "killswitch-agent"), "status", "--state-dir", str(tmp_path / "state"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(as_json)["epoch"] == cli.json("status")["epoch"]


def test_the_desktop_backend_runs_the_platform_notifier(
    server: ServerProcess, cli: Cli, reference_agent: StartAgent, tmp_path: Path
) -> None:
    """On Linux, `notify-send` (a stand-in on PATH that records its arguments)."""
    shown = tmp_path / "shown.txt"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {shown}\necho >> {shown}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    reference_agent(server, cli, "--notify", "desktop", env=env)
    wait_for(lambda: state_of(cli) == "CAPTURING", 30, "the agent capturing")
    cli.pause("--all", "--reason", "breach at vendor", "--ticket", "INC-42")
    wait_for(lambda: shown.exists() and shown.read_text().strip(), 20, "a desktop notice")
    assert shown.read_text().strip() == (
        "--app-name|killswitch|killswitch|"
        "Capture paused on laptop-1: breach at vendor [INC-42]; decided by ic-1|"
    )


def test_status_without_state_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "killswitch-agent"), "status", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no capture state" in result.stderr


def test_the_simulator_writes_one_line_per_agent_notice(
    server: ServerProcess, cli: Cli, simulate: Simulate, tmp_path: Path
) -> None:
    out = tmp_path / "fleet-notices.jsonl"
    simulate(server, 3, "--notify", f"file:{out}")
    wait_for(
        lambda: sum(a["state"] == "CAPTURING" for a in cli.agents().values()) == 3, 30, "capture"
    )
    cli.pause("--all", "--reason", "drill", "--ticket", "DRILL-1")
    wait_for(lambda: len(notices(out)) == 3, 20, "a notice from every agent")
    lines = notices(out)
    assert sorted(line["agent_id"] for line in lines) == sorted(cli.agents())
    assert {(line["state"], line["ticket"], line["decided_by"]) for line in lines} == {
        ("paused", "DRILL-1", "ic-1")
    }


@pytest.mark.parametrize(
    ("platform", "program"),
    [("linux", "notify-send"), ("darwin", "osascript"), ("win32", "powershell")],
)
def test_desktop_notifiers_pass_the_text_as_data_never_through_a_shell(
    platform: str, program: str
) -> None:
    command, variables = desktop_command(NOTICE, platform)
    assert command[0] == program
    if platform == "darwin":
        # AppleScript: the quotes in the text are escaped inside the string literal.
        assert 'display notification "Capture paused on laptop-1: breach \\"INC-7\\"' in command[-1]
    elif platform == "win32":
        # PowerShell joins -Command's further arguments into the script: the text is
        # handed over in the environment instead, and appears in no argument.
        assert variables == {"KILLSWITCH_NOTICE_TEXT": NOTICE.text()}
        assert not any("rm -rf" in part for part in command)
    else:
        assert command[-1] == NOTICE.text()


def test_notify_choices() -> None:
    assert type(notifier_from("stdout")).__name__ == "LineNotifier"
    assert type(notifier_from("desktop")).__name__ == "DesktopNotifier"
    assert type(notifier_from("file:/tmp/x")).__name__ == "FileNotifier"
    for bad in ("file:", "email", ""):
        with pytest.raises(NotifierSpecError, match="file:PATH, stdout or desktop"):
            notifier_from(bad)
