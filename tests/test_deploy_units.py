"""deploy/systemd and deploy/launchd, checked against the commands they run.

Every flag the units and the launchd job pass exists (the real argparse parsers), each
unit is hardened and restarts, and the macOS job runs what the Linux agent unit runs.
``systemd-analyze verify`` runs only when it is installed.
"""

from __future__ import annotations

import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.deploy_support import DEPLOY
from tests.deploy_support import SYSTEMD
from tests.deploy_support import parse_as

# Each unit's EnvironmentFile, as the example shipped next to it.
ENV_EXAMPLES = {
    "killswitch.service": "killswitch.env.example",
    "killswitch-agent.service": "killswitch-agent.env.example",
}
# What the units' specifiers stand for when their command lines are parsed here.
SPECIFIERS = {"%H": "laptop-1.example.com", "%m": "0123456789abcdef0123456789abcdef", "%%": "%"}


# ------------------------------------------------------------------ systemd units


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        assert equals, f"{path.name}: not an assignment: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def unit_value(path: Path, key: str, section: str = "Service") -> str:
    values = unit_values(path, key, section)
    assert len(values) == 1, f"{path.name}: {key}= set {len(values)} times"
    return values[0]


def env_file(path: Path) -> dict[str, str]:
    variables: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            variables[key.strip()] = value.strip()
    return variables


def unit_environment(path: Path) -> dict[str, str]:
    """Environment= then the EnvironmentFile example, later ones winning, as systemd does."""
    variables: dict[str, str] = {}
    for assignment in unit_values(path, "Environment"):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            variables[key] = value
    assert unit_values(path, "EnvironmentFile"), f"{path.name} has no EnvironmentFile"
    variables |= env_file(SYSTEMD / ENV_EXAMPLES[path.name])
    return variables


def exec_start_argv(path: Path) -> list[str]:
    """ExecStart= as systemd would run it with the example environment file."""
    command = unit_value(path, "ExecStart").lstrip("@-:+!")
    variables = unit_environment(path)
    for specifier, value in SPECIFIERS.items():
        command = command.replace(specifier, value)
    argv: list[str] = []
    for word in shlex.split(command):
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:  # ${VAR}: exactly one argument
            assert braced[1] in variables, f"{path.name}: ${{{braced[1]}}} is never set"
            argv.append(variables[braced[1]])
        elif bare:  # $VAR: split into words, none when empty
            assert bare[1] in variables, f"{path.name}: ${bare[1]} is never set"
            argv += variables[bare[1]].split()
        else:
            assert "$" not in word, f"{path.name}: {word!r} mixes text and variables"
            argv.append(word)
    return argv


UNITS = sorted(ENV_EXAMPLES)


def test_every_unit_has_an_example_environment_file() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == UNITS
    for unit in UNITS:
        assert (SYSTEMD / ENV_EXAMPLES[unit]).exists()


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_its_command_with_flags_that_exist(unit: str) -> None:
    argv = exec_start_argv(SYSTEMD / unit)
    program = PurePosixPath(argv[0])
    assert program.is_absolute(), "systemd needs an absolute path"
    args = parse_as(program.name, argv[1:])
    state_dir = f"/var/lib/{unit_value(SYSTEMD / unit, 'StateDirectory')}"
    if program.name == "killswitch":
        assert args.command == "serve" and not args.insecure
        assert args.data_dir == state_dir
        assert args.log_format == "json"
    else:
        assert args.command == "run" and not args.insecure
        assert str(args.state_dir) == state_dir
        assert args.enroll_token, "the example enrols"
        # One id per laptop: a specifier, never a constant shared by the fleet.
        raw = shlex.split(unit_value(SYSTEMD / unit, "ExecStart"))
        assert raw[raw.index("--agent-id") + 1] in ("%H", "%m")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened_and_always_restarts(unit: str) -> None:
    path = SYSTEMD / unit
    required = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "always",
        "UMask": "0077",
    }
    for key, value in required.items():
        assert unit_value(path, key) == value, f"{unit}: {key}="
    assert float(unit_value(path, "RestartSec")) > 0
    assert unit_value(path, "StateDirectory")
    dynamic = unit_values(path, "DynamicUser") == ["yes"]
    user = unit_values(path, "User")
    assert dynamic or (user and user[0] not in ("root", "0")), f"{unit} runs as root"
    assert unit_value(path, "StartLimitIntervalSec", "Unit") == "0", "never give up"
    assert unit_value(path, "WantedBy", "Install") == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """Optional: only where systemd-analyze is installed. The units name the binaries in
    /usr/local/bin; here they point at this virtualenv's, which exist."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bin_dir = Path(sys.executable).parent
    copies = []
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/usr/local/bin/", f"{bin_dir}/")
        (tmp_path / unit).write_text(text)
        copies.append(str(tmp_path / unit))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # It exits 0 on unknown keys and bad values, which it only reports: any line about
    # our units is a failure.
    output = result.stdout + result.stderr
    ours = [
        line
        for line in output.splitlines()
        if str(tmp_path) in line or line.startswith(tuple(UNITS))
    ]
    assert result.returncode == 0 and not ours, output


# ------------------------------------------------------------------ launchd (macOS)

LAUNCHD_PLIST = DEPLOY / "launchd" / "com.killswitch.agent.plist"
AGENT_UNIT = SYSTEMD / "killswitch-agent.service"


def launchd_job() -> dict[str, Any]:
    with LAUNCHD_PLIST.open("rb") as source:
        job: dict[str, Any] = plistlib.load(source)
    return job


def launchd_argv(job: dict[str, Any]) -> list[str]:
    """The agent's argv as ``/bin/sh -c`` builds it from the job's environment."""
    shell, flag, command = job["ProgramArguments"]
    assert (shell, flag) == ("/bin/sh", "-c")
    words = shlex.split(command)
    assert words[0] == "exec", "the shell execs the agent, so launchd signals it directly"
    variables: dict[str, str] = job["EnvironmentVariables"]
    argv: list[str] = []
    for word in words[1:]:
        bare = re.fullmatch(r"\$(\w+)", word)
        if word == "$(/bin/hostname -s)":
            argv.append(SPECIFIERS["%H"])
        elif bare:  # unquoted: split into words, none when empty
            argv += variables[bare[1]].split()
        else:
            argv.append(re.sub(r"\$(\w+)", lambda m: variables[m[1]], word))
    return argv


def test_launchd_job_runs_the_systemd_units_command() -> None:
    job = launchd_job()
    mac, linux = launchd_argv(job), exec_start_argv(AGENT_UNIT)
    assert mac[0] == linux[0] == "/usr/local/bin/killswitch-agent"
    mac_args, linux_args = (
        parse_as("killswitch-agent", mac[1:]),
        parse_as("killswitch-agent", linux[1:]),
    )
    # Only where state lives differs between the platforms.
    assert PurePosixPath(mac_args.state_dir).is_absolute()
    assert vars(mac_args) | {"state_dir": None} == vars(linux_args) | {"state_dir": None}
    python_env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    assert python_env.items() <= job["EnvironmentVariables"].items()
    assert python_env.items() <= unit_environment(AGENT_UNIT).items()


def test_launchd_job_starts_at_boot_and_always_restarts_like_the_unit() -> None:
    job = launchd_job()
    assert job["Label"] == LAUNCHD_PLIST.stem
    assert job["RunAtLoad"] is True and job["KeepAlive"] is True, "never give up"
    assert job["ThrottleInterval"] == float(unit_value(AGENT_UNIT, "RestartSec"))
    assert job["ExitTimeOut"] == float(unit_value(AGENT_UNIT, "TimeoutStopSec"))
    assert job["Umask"] == int(unit_value(AGENT_UNIT, "UMask"), 8)
    assert PurePosixPath(job["StandardOutPath"]).is_absolute()
    assert job["StandardErrorPath"] == job["StandardOutPath"]
