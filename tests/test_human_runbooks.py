"""The runbooks in runbooks/ work as written.

Each Markdown runbook's ``sh`` blocks run, in order, as one ``set -euo pipefail`` bash
script, as the people the blocks name, against a real mTLS server and simulated laptops
put in the situation the runbook is for. The parsing and the script live in
tests/human_runbooks.py; the conventions are in runbooks/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.cli.app import build_parser
from tests import human_runbooks as hr
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import free_port
from tests.conftest import missing_tool
from tests.conftest import wait_capturing
from tests.conftest import wait_for

ALERTS_FILE = hr.REPO / "deploy" / "prometheus" / "alerts.yml"
SCRIPT_TIMEOUT = 300.0
# Every runbook has a scenario below; a new runbook without one fails test_index.
SCENARIOS = {
    "agents-disconnected.md",
    "control-plane-down.md",
    "fleet-pause.md",
    "quarterly-drill.md",
    "staged-reenable.md",
    "violation.md",
}
# Flags the conventions leave to the environment (KILLSWITCH_SERVER, KILLSWITCH_IDENTITY).
CONNECTION_FLAGS = re.compile(r"(?<![\w-])--(server|identity|insecure|as)(?![\w-])")
AGENT_ID = re.compile(r"^(laptop|desk)-\d{5}$")


# ------------------------------------------------------------------ the Markdown itself


def test_parser_reads_attributes_and_builds_the_script(tmp_path: Path) -> None:
    doc = tmp_path / "sample.md"
    doc.write_text(
        "Run `killswitch status` first.\n\n"
        "```sh\nHOLD=$(killswitch pause --all --reason r -q)\nkillswitch status\n```\n\n"
        '```sh {as=approver-1}\nkillswitch approve "$REQ"\n```\n\n'
        "```sh {expect-exit=4}\nkillswitch status\n```\n\n"
        "```sh {background}\nkillswitch serve --data-dir d\n```\n\n"
        "```text\nkillswitch holds\n```\n"
    )
    runbook = hr.parse(doc)
    assert [b.language for b in runbook.blocks] == ["sh", "sh", "sh", "sh", "text"]
    assert [b.identity for b in runbook.runnable] == ["ic-1", "approver-1", "ic-1", "ic-1"]
    assert [b.expected_exit for b in runbook.runnable] == [None, None, 4, None]
    assert [b.background for b in runbook.runnable] == [False, False, False, True]
    assert runbook.commands_shown() == [(1, "killswitch status"), (21, "killswitch holds")]
    text = hr.script(runbook, Path("/ids"), Path("/bg.log"))
    assert "export KILLSWITCH_IDENTITY=/ids/approver-1" in text
    assert ") >>/bg.log 2>&1 &" in text
    assert 'if [ "$runbook_rc" -ne 4 ]' in text
    assert hr.command_is_run("killswitch agents --state X", "killswitch agents --state X --json")
    assert not hr.command_is_run("killswitch me", "killswitch metrics")

    for bad in ("```bash\nls\n```\n", "```sh {sudo}\nls\n```\n", "```sh {as=root}\nls\n```\n"):
        doc.write_text(bad)
        with pytest.raises(hr.RunbookError):
            hr.parse(doc)


def test_runbooks_follow_the_conventions() -> None:
    index = hr.parse(hr.RUNBOOKS / "README.md")
    assert not index.runnable, "the index documents; it has no runnable blocks"
    for runbook in hr.runbooks():
        assert runbook.runnable, f"{runbook.name} has no ```sh blocks"
        text = runbook.path.read_text()
        assert "KILLSWITCH_SERVER" in text and "KILLSWITCH_IDENTITY" in text, (
            f"{runbook.name} must say to set KILLSWITCH_SERVER and KILLSWITCH_IDENTITY"
        )
        for block in runbook.runnable:
            flag = CONNECTION_FLAGS.search(block.text)
            assert flag is None, (
                f"{block.where}: {flag.group(0) if flag else ''}: commands take the server and"
                " identity from KILLSWITCH_SERVER and KILLSWITCH_IDENTITY"
            )


def test_every_command_shown_is_one_the_test_runs() -> None:
    """No `killswitch ...` in the prose or in example output escapes the test."""
    books = hr.runbooks()
    everything = "\n".join(b.text for r in books for b in r.runnable)
    missing = []
    for runbook in [*books, hr.parse(hr.RUNBOOKS / "README.md")]:
        runnable = "\n".join(b.text for b in runbook.runnable) or everything
        for line, command in runbook.commands_shown():
            if not hr.command_is_run(command, runnable):
                missing.append(f"{runbook.name}:{line}: {command}")
    assert not missing, "shown but never run:\n" + "\n".join(missing)


def killswitch_invocations(text: str) -> list[list[str]]:
    """The `killswitch ...` commands of a shell block (not those inside quoted strings),
    each up to the first unquoted shell operator."""
    found: list[list[str]] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif text.startswith("killswitch ", i) and (i == 0 or text[i - 1] in " \t\n($"):
            end, inner = i, ""
            while end < len(text):
                d = text[end]
                if inner:
                    inner = "" if d == inner else inner
                elif d in "'\"":
                    inner = d
                elif d in ")|;&><\n":
                    break
                end += 1
            found.append(shlex.split(text[i:end]))
            i = end
            continue
        i += 1
    return found


def test_commands_and_flags_exist() -> None:
    """Every `killswitch` command in a runnable block parses with the real CLI (variables
    stand in as plain words), so no runbook invents a flag, even those not run yet."""
    parser = build_parser()
    checked = 0
    for runbook in hr.runbooks():
        for block in runbook.runnable:
            for argv in killswitch_invocations(block.text):
                args = [re.sub(r"\$\{?\w+\}?", "x", word) for word in argv[1:]]
                try:
                    parser.parse_args(args)
                except SystemExit as exc:
                    pytest.fail(f"{block.where}: {' '.join(argv)}: the CLI refuses it ({exc})")
                checked += 1
    assert checked > 20


def test_alerts_link_to_runbooks_that_answer_them() -> None:
    rules: list[dict[str, Any]] = [
        rule
        for group in yaml.safe_load(ALERTS_FILE.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert rules
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        runbook = hr.REPO / url
        assert runbook.is_file(), f"{rule['alert']}: runbook {url} does not exist"
        assert f"Runbook: {url}" in rule["annotations"]["description"]
        assert rule["alert"] in runbook.read_text(), f"{url} never names {rule['alert']}"


def test_index_lists_every_runbook() -> None:
    index = (hr.RUNBOOKS / "README.md").read_text()
    names = {r.name for r in hr.runbooks()}
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    assert names == linked, f"README.md links {sorted(linked)}, runbooks are {sorted(names)}"
    assert names == SCENARIOS, "every runbook needs a scenario in this file"


# ------------------------------------------------------------------ running them


@dataclass
class Transcript:
    """What the operator would have seen: stdout, stderr and the xtrace, interleaved."""

    runbook: hr.Runbook
    output: str
    cwd: Path

    def lines(self) -> list[str]:
        return self.output.splitlines()

    def of_block(self, snippet: str) -> str:
        """The output of the first runnable block whose text contains ``snippet``."""
        for block in self.runbook.runnable:
            if snippet in block.text:
                marker = f"### {block.where} as {block.identity}"
                after = self.output.split(marker, 1)[1]
                return after.split("+ : '###", 1)[0]
        raise AssertionError(f"no block of {self.runbook.name} contains {snippet!r}")

    def tail(self) -> str:
        return self.output[-6000:]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class Runner:
    """Runs a runbook as a bash script in its own process group; stops what it left behind
    (`killswitch serve` from a background block) by that group's id."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.groups: list[int] = []

    def workdir(self) -> Path:
        """A copy of runbooks/ whose YAML waves soak for 1 s (time out after 60 s)."""
        cwd = self.tmp_path / "cwd"
        if not cwd.exists():
            shutil.copytree(hr.RUNBOOKS, cwd / "runbooks")
            for path in [*cwd.rglob("*.yaml"), *cwd.rglob("*.yml")]:
                data = shorten(yaml.safe_load(path.read_text()))
                path.write_text(yaml.safe_dump(data, sort_keys=False))
        return cwd

    def run(self, name: str, server: ServerProcess) -> Transcript:
        runbook = hr.parse(hr.RUNBOOKS / name)
        commands = "".join(b.text for b in runbook.runnable)
        for tool in ("curl", "jq"):
            if re.search(rf"(?<![\w-]){tool} ", commands) and shutil.which(tool) is None:
                missing_tool(f"{name} uses {tool}, which is not installed")
        stem = runbook.path.stem
        script = self.tmp_path / f"{stem}.sh"
        people = {server.identity(name).parent for name in hr.IDENTITIES}
        script.write_text(
            hr.script(runbook, people.pop(), self.tmp_path / f"{stem}.background.log")
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILLSWITCH_")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            KILLSWITCH_SERVER=server.address,
            KILLSWITCH_HTTP=f"127.0.0.1:{server.http_port}",
            KILLSWITCH_DATA_DIR=str(server.data_dir),
        )
        cwd = self.workdir()
        log = self.tmp_path / f"{stem}.transcript"
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", str(script)],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(proc.pid)
        try:
            returncode: int | None = proc.wait(timeout=SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
        transcript = Transcript(runbook, log.read_text(errors="replace"), cwd)
        took = time.monotonic() - started
        assert returncode == 0, (
            f"{name} exited {returncode} after {took:.0f}s"
            f" ({'timed out' if returncode is None else 'see the last block'});"
            f" transcript:\n{transcript.tail()}\nserver log:\n{server.log()}"
        )
        return transcript

    def stop(self) -> None:
        for pgid in self.groups:
            left = group_members(pgid)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 10
                while left and time.monotonic() < deadline:
                    time.sleep(0.1)
                    left = group_members(pgid)
                if not left:
                    break


def shorten(node: Any) -> Any:
    """Every ``soak:`` becomes 1s and every ``timeout:`` 60s, at any depth."""
    if isinstance(node, dict):
        out: dict[Any, Any] = {}
        for key, value in node.items():
            if key == "soak":
                out[key] = "1s"
            elif key == "timeout":
                out[key] = "60s"
            else:
                out[key] = shorten(value)
        return out
    if isinstance(node, list):
        return [shorten(item) for item in node]
    return node


def wait_whole_fleet(cli: Cli, state: str, fleet: int, timeout: float, what: str) -> None:
    """Until all ``fleet`` agents, and no other, are in ``state``."""
    wait_for(lambda: cli.json("status")["agents"]["by_state"] == {state: fleet}, timeout, what)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    run = Runner(tmp_path)
    yield run
    run.stop()


def test_shorten_rewrites_soaks_and_timeouts() -> None:
    data = {"waves": [{"percent": 1, "soak": "10m", "gates": {"timeout": "15m"}}], "soak": "5m"}
    assert shorten(data) == {
        "waves": [{"percent": 1, "soak": "1s", "gates": {"timeout": "60s"}}],
        "soak": "1s",
    }


def audit(cli: Cli) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = cli.json("audit")
    return entries


def test_fleet_pause_runbook(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """A healthy fleet with slow laptops: the pause is proven, the employee sees it, and
    two people lift it."""
    fleet = 30
    simulate(server, fleet, "--fault", "slow=0.2", "--slow-max", "3", "--fault-after", "0")
    wait_capturing(cli, fleet)

    transcript = runner.run("fleet-pause.md", server)

    verify = transcript.of_block("killswitch status\nkillswitch holds")
    assert "COMPLIANT" in verify.splitlines(), verify
    assert f"{fleet} agents, {fleet} settled" in verify
    assert "VERIFIED_STOPPED" in verify
    me = transcript.of_block("killswitch me")
    assert "laptop-00000: capture OFF (VERIFIED_STOPPED)" in me, me
    assert "while we investigate INC-1" in me
    entries = audit(cli)
    (created,) = [e for e in entries if e["action"] == "hold.create"]
    assert (created["actor"], created["ticket"], created["result"]) == ("ic-1", "INC-1", "ok")
    hold_id = created["target"].split()[0]
    assert f"hold: {hold_id}" in transcript.lines()
    approvals = [e for e in entries if e["action"] == "resume.approve"]
    assert [(e["actor"], e["result"]) for e in approvals] == [("approver-1", "ok")]
    assert cli.json("holds")["holds"] == []
    wait_whole_fleet(
        cli, "CAPTURING", fleet, 30, "the fleet capturing again after the two-person resume"
    )


def test_violation_runbook(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """A paused fleet where one laptop lies: it is contained under its own hold, the
    violation is acknowledged with a note, and the audit log records both."""
    sim = simulate(server, 10, "--fault", "lie=0.1", "--fault-after", "3600")
    wait_capturing(cli, 10)
    wait_for(lambda: all(a["lease_expires_at"] for a in cli.agents().values()), 30, "leases")
    sim.proc.send_signal(signal.SIGUSR1)
    fleet_hold = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-1")
    flagged = wait_for(
        lambda: [a for a, row in cli.agents().items() if row["state"] == "VIOLATION"],
        30,
        "the lying laptop flagged",
    )
    (liar,) = flagged

    transcript = runner.run("violation.md", server)

    evidence = transcript.of_block("killswitch agents --state VIOLATION --json")
    assert liar in evidence and "after" in evidence, evidence
    holds = cli.json("holds")["holds"]
    assert {h["id"] for h in holds} > {fleet_hold}, "the fleet hold stays"
    (own,) = [h for h in holds if h["scope"] == {"agents": [liar]}]
    assert own["keep_spool"] is True and own["ticket"] == "INC-1"
    acks = [e for e in audit(cli) if e["action"] == "agent.acknowledge_violation"]
    assert [(e["actor"], e["target"], e["result"]) for e in acks] == [("ic-1", liar, "ok")]
    assert "laptop isolated by endpoint security" in acks[0]["reason"]
    assert "after acking pause" in acks[0]["detail"] or "after its pause" in acks[0]["detail"]
    assert "agent.acknowledge_violation" in transcript.of_block("grep agent.acknowledge_violation")
    # The liar keeps capturing, so the evidence recurs: still paused by its own hold.
    assert own["id"] in cli.agents()[liar]["hold_ids"]


def port_pair() -> int:
    """A free port whose successor is free too: `serve` enrols on the gRPC port + 1."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


@pytest.fixture
def default_ports_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server on the ports a by-hand restart uses: enrolment on the gRPC port + 1."""
    server = ServerProcess(tmp_path / "data-default-ports", [])
    server.grpc_port = port_pair()
    server.address = f"127.0.0.1:{server.grpc_port}"
    server.enroll_port = server.grpc_port + 1
    server.enroll_address = f"127.0.0.1:{server.enroll_port}"
    server.start()
    yield server
    server.stop()


def test_control_plane_down_runbook(
    default_ports_server: ServerProcess, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """The server is killed with -9 during a pause: the runbook sees it down, checks the
    database, restarts it by hand, and the fleet is proven stopped again."""
    server = default_ports_server
    cli = Cli(server)
    fleet = 20
    simulate(server, fleet)
    wait_capturing(cli, fleet)
    hold_id = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-1", "--wait")
    epoch = cli.json("status")["epoch"]
    server.kill9()

    transcript = runner.run("control-plane-down.md", server)

    assert "audit log intact" in transcript.of_block('--data-dir "$KILLSWITCH_DATA_DIR"')
    assert "ready" in transcript.of_block("/readyz").split()
    assert "audit log intact" in transcript.of_block("killswitch audit verify\n")
    status = cli.json("status")
    assert [h["id"] for h in status["holds"]] == [hold_id] and status["epoch"] == epoch
    wait_whole_fleet(
        cli,
        "VERIFIED_STOPPED",
        fleet,
        60,
        "every laptop reconnected to the restarted server and proven stopped again",
    )


def test_agents_disconnected_runbook(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """A third of the laptops went away: the runbook lists exactly those."""
    simulate(server, 20)
    gone = simulate(server, 10, "--id-prefix", "desk", "--seed", "7")
    wait_capturing(cli, 30)
    gone.stop()
    desks = {f"desk-{i:05d}" for i in range(10)}
    wait_for(
        lambda: {a for a, r in cli.agents().items() if r["state"] == "OFFLINE"} == desks,
        30,
        "the desks offline",
    )

    transcript = runner.run("agents-disconnected.md", server)

    listed = transcript.of_block("killswitch agents --state OFFLINE\n")
    rows = [line.split() for line in listed.splitlines()]
    offline = {row[0] for row in rows if row and AGENT_ID.match(row[0])}
    assert offline == desks, listed
    counts = transcript.of_block("killswitch agents --state OFFLINE -q | wc -l")
    assert "10" in counts.split(), counts
    metrics = transcript.of_block("/metrics")
    assert re.search(r"^killswitch_connected_streams 20(\.0)?$", metrics, re.M), metrics


def test_staged_reenable_runbook(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """After INC-1, two people re-enable the fleet in waves, and it all captures again."""
    fleet = 100
    simulate(server, fleet)
    wait_capturing(cli, fleet)
    hold_id = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-1", "--wait")

    transcript = runner.run("staged-reenable.md", server)

    (run_id,) = [line.split()[1] for line in transcript.lines() if line.startswith("run: ")]
    run = cli.json("runbook", "status", run_id)
    assert run["state"] == "completed", run
    assert len(run["waves"]) == 5 and {w["state"] for w in run["waves"]} == {"passed"}, run
    # The run swapped the incident hold for its own rollout hold, gone after the last wave.
    assert run["hold_id"] != hold_id and cli.json("holds")["holds"] == []
    lifted = [e["target"].split()[0] for e in audit(cli) if e["action"] == "hold.lift"]
    assert lifted == [hold_id, run["hold_id"]], lifted
    wait_whole_fleet(cli, "CAPTURING", fleet, 60, "the whole fleet capturing after the last wave")
    approvals = [e for e in audit(cli) if e["action"] == "resume.approve"]
    assert [e["actor"] for e in approvals] == ["approver-1"]


def test_quarterly_drill_runbook(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], runner: Runner
) -> None:
    """The drill pauses the canaries, proves them stopped, and re-enables them after a
    two-person resume; its figures are kept."""
    fleet = 100
    simulate(server, fleet)
    wait_capturing(cli, fleet)

    canaries = {a for a, row in cli.agents().items() if row["labels"].get("ring") == "canary"}
    assert canaries, "the simulator labels a canary ring"

    transcript = runner.run("quarterly-drill.md", server)

    paused = transcript.of_block('killswitch agents --hold "$HOLD"')
    rows = [line.split() for line in paused.splitlines()]
    stopped = {row[0] for row in rows if row and AGENT_ID.match(row[0])}
    assert stopped == canaries and paused.count("VERIFIED_STOPPED") == len(canaries), paused
    (report_path,) = transcript.cwd.glob("drill-*.json")
    report = json.loads(report_path.read_text())
    assert report["state"] == "completed", report
    assert report["pause_time_to_compliance_seconds"] > 0, report
    assert sum(w["agents"] for w in report["waves"]) == len(canaries), report
    assert all(w["time_to_compliance_seconds"] is not None for w in report["waves"]), report
    assert cli.json("holds")["holds"] == []
    wait_whole_fleet(cli, "CAPTURING", fleet, 60, "the canaries capturing again")
