"""deploy/kubernetes, deploy/systemd and deploy/launchd, checked against the code they deploy.

Every flag the manifests and units pass exists (the real argparse parsers), the probes hit
the port and paths the server serves, the Services select the Deployment's pods and expose
its ports, and the PKI is mounted where ``serve`` reads it. No cluster is needed:
``kubectl kustomize`` and ``systemd-analyze verify`` run only when they are installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml

from agent_stub import cli as agent_cli
from control import cli as control_cli
from control import pki
from control.metrics import Metrics
from control.web import WebServer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
MANIFEST = KUBERNETES / "killswitch.yaml"
DOCKERFILE = KUBERNETES / "Dockerfile"
# Each unit's EnvironmentFile, as the example shipped next to it.
ENV_EXAMPLES = {
    "killswitch.service": "killswitch.env.example",
    "killswitch-agent.service": "killswitch-agent.env.example",
}
# What the units' specifiers stand for when their command lines are parsed here.
SPECIFIERS = {"%H": "laptop-1.example.com", "%m": "0123456789abcdef0123456789abcdef", "%%": "%"}
# What a replica needs, and never the root key.
PKI_FILES = set(pki.REPLICA_FILES)

# ------------------------------------------------------------------ helpers


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(f"{parser.prog} has no subcommand {name}")


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def unknown_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The ``--flags`` in ``argv`` that ``parser`` does not define (values skipped)."""
    known = options(parser)
    unknown: list[str] = []
    words = iter(argv)
    for word in words:
        if not word.startswith("-"):
            continue
        flag, has_value, _ = word.partition("=")
        action = known.get(flag)
        if action is None:
            unknown.append(flag)
        elif action.nargs != 0 and not has_value:
            next(words, None)
    return unknown


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse as the command would, turning argparse's exit into a readable failure."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{shlex.join(argv)!r} is refused: {errors.getvalue()}") from exc


def parse_as(program: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` (after the program) checked against that program's real parser."""
    parser = {"killswitch": control_cli.build_parser, "killswitch-agent": agent_cli.build_parser}[
        program
    ]()
    command = subcommand(parser, argv[0])
    assert not unknown_flags(argv[1:], command), (
        f"`{program} {argv[0]}` has no {unknown_flags(argv[1:], command)}"
        f" (it has {sorted(options(command))})"
    )
    return parse(parser, argv)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``768Mi``, ``1G``) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None and match[2] in (*units, ""), f"bad quantity {text!r}"
    return float(match[1]) * units.get(match[2], 1)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------ Kubernetes objects


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> list[dict[str, Any]]:
    return load_yaml(MANIFEST)


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {MANIFEST.name}, found {found}"
    return found[0]


def deployment() -> dict[str, Any]:
    return the("Deployment", "killswitch")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def server_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def container_port(port: int | str) -> int:
    """A port number, or a container port's name, as the number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in server_container()["ports"]}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def serve_args() -> argparse.Namespace:
    container = server_container()
    argv = [*container.get("command", []), *container["args"]]
    assert argv[0] == "killswitch", argv
    return parse_as("killswitch", argv[1:])


def services_selecting_pods() -> Iterator[dict[str, Any]]:
    for obj in objects():
        if obj["kind"] == "Service" and selects(obj["spec"].get("selector", {}), pod_labels()):
            yield obj


def headless_service() -> dict[str, Any]:
    headless = [s for s in services_selecting_pods() if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1, "expected one headless Service selecting the server pods"
    return headless[0]


def exposed_ports(service: dict[str, Any]) -> dict[int, int]:
    """Service port -> container port it reaches."""
    return {
        int(p["port"]): container_port(p.get("targetPort", p["port"]))
        for p in service["spec"]["ports"]
    }


# ------------------------------------------------------------------ Kubernetes tests


def test_every_yaml_document_parses_and_is_a_kubernetes_object() -> None:
    paths = sorted(KUBERNETES.glob("*.yaml"))
    assert MANIFEST in paths
    for path in paths:
        docs = load_yaml(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path.name}: {doc}"
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], f"{path.name}: {doc['kind']} without a name"
    namespace = the("Namespace")["metadata"]["name"]
    for obj in objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")[0]
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_kustomize_renders_the_same_objects() -> None:
    """Optional: only where kubectl is installed (offline; no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)}
    assert rendered == {(o["kind"], o["metadata"]["name"]) for o in objects()}


def test_deployment_runs_serve_with_flags_that_exist() -> None:
    args = serve_args()
    assert args.command == "serve"
    assert not args.insecure, "production replicas run with mTLS"
    # Probes and Services reach the pod on its IP: nothing may listen on loopback only.
    for address in (args.grpc, args.http, args.enroll):
        assert address is not None
        assert address.rpartition(":")[0] in ("0.0.0.0", "[::]", "::"), address
    # Each listen port is declared on the container.
    declared = {p["containerPort"] for p in server_container()["ports"]}
    assert {port_of(args.grpc), port_of(args.http), port_of(args.enroll)} <= declared


def test_deployment_names_its_database_without_putting_it_in_the_args() -> None:
    """Every replica must use the shared PostgreSQL; `serve` reads KILLSWITCH_DATABASE."""
    container = server_container()
    env = {e["name"]: e for e in container.get("env", [])}
    if serve_args().database:
        # On the command line: then only by reference to the container's environment.
        references = re.findall(r"\$\((\w+)\)", " ".join(container["args"]))
        assert references, "a literal --database URL would put its password in the pod spec"
        assert set(references) <= env.keys()
        variable = references[0]
    else:
        variable = "KILLSWITCH_DATABASE"
        assert variable in env, "no --database and no KILLSWITCH_DATABASE: SQLite per replica"
    assert "secretKeyRef" in env[variable].get("valueFrom", {}), "the URL comes from a Secret"


def test_probes_hit_the_http_port_and_the_paths_the_server_serves() -> None:
    container = server_container()
    http_port = port_of(serve_args().http)
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert container_port(get["port"]) == http_port, f"{probe} is not on --http"
    # The startup probe covers the database connect and migrations before the HTTP port
    # opens; liveness must not kill a replica that is only not ready.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_the_server_serves_the_probe_and_metrics_paths() -> None:
    """The paths the manifest relies on, from a real WebServer: /healthz is alive,
    /readyz follows readiness (503 when the state is not loaded or the store is lost)."""
    ready = False

    async def scenario() -> dict[str, int]:
        nonlocal ready
        server = WebServer(
            "127.0.0.1",
            0,
            not_ready=lambda: "" if ready else "store cannot write: disk full",
            routes=Metrics().routes(),
        )
        await server.start()
        codes: dict[str, int] = {}
        try:
            async with aiohttp.ClientSession() as session:

                async def status(path: str) -> int:
                    async with session.get(f"http://127.0.0.1:{server.port}{path}") as r:
                        if r.status == 503:  # says why, in one line
                            assert await r.text() == "not ready: store cannot write: disk full\n"
                        return r.status

                codes["/healthz"] = await status("/healthz")
                codes["/readyz not ready"] = await status("/readyz")
                ready = True
                codes["/readyz"] = await status("/readyz")
        finally:
            await server.stop()
        return codes

    assert asyncio.run(scenario()) == {"/healthz": 200, "/readyz not ready": 503, "/readyz": 200}
    paths = {route.path for route in Metrics().routes() if isinstance(route, aiohttp.web.RouteDef)}
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == port_of(serve_args().http)


def test_several_replicas_and_a_disruption_budget() -> None:
    replicas = deployment()["spec"]["replicas"]
    assert replicas >= 2
    assert selects(deployment()["spec"]["selector"]["matchLabels"], pod_labels())
    budget = the("PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels())
    min_available = budget["spec"]["minAvailable"]
    assert isinstance(min_available, int), "an absolute minAvailable"
    assert 2 <= min_available < replicas, "drains must be able to proceed, one at a time"
    rollout = deployment()["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0 and rollout["maxSurge"] == 1


def test_replicas_are_spread_across_nodes() -> None:
    spec = pod_spec()
    spread = [
        c
        for c in spec.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
        and selects(c["labelSelector"]["matchLabels"], pod_labels())
    ]
    anti = spec.get("affinity", {}).get("podAntiAffinity", {})
    assert spread or anti, "nothing keeps two replicas off one node"
    assert any(c["whenUnsatisfiable"] == "DoNotSchedule" for c in spread)


def test_headless_service_gives_agents_one_name_for_every_ready_replica() -> None:
    args = serve_args()
    service = headless_service()
    assert not service["spec"].get("publishNotReadyAddresses", False)
    ports = exposed_ports(service)
    grpc_port, enroll_port = port_of(args.grpc), port_of(args.enroll)
    # Agents connect to pod IPs, so the Service port must be the container port itself.
    assert ports.get(grpc_port) == grpc_port, f"--grpc {grpc_port} not exposed: {ports}"
    # Agents enrol at the --server host, port + 1, unless told otherwise.
    assert enroll_port == grpc_port + 1
    assert ports.get(enroll_port) == enroll_port, f"--enroll {enroll_port} not exposed"


def test_operators_service_exposes_grpc_and_http() -> None:
    args = serve_args()
    normal = [s for s in services_selecting_pods() if s["spec"].get("clusterIP") != "None"]
    assert len(normal) == 1
    reached = set(exposed_ports(normal[0]).values())
    assert {port_of(args.grpc), port_of(args.http)} <= reached


def test_pki_is_mounted_where_serve_reads_it() -> None:
    """`serve` reads DATA/pki's REPLICA_FILES (control.pki.Authority), not the root key."""
    args = serve_args()
    mounts = {m["mountPath"]: m for m in server_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    pki_dir = str(PurePosixPath(args.data_dir) / pki.PKI_DIR)
    assert pki_dir in mounts, f"nothing mounted at {pki_dir}"
    assert mounts[pki_dir].get("readOnly") is True
    volume = volumes[mounts[pki_dir]["name"]]
    sources = [s["secret"] for s in volume["projected"]["sources"]] if "projected" in volume else []
    if "secret" in volume:
        sources.append(volume["secret"])
    files = {item["path"] for source in sources for item in source.get("items", [])}
    assert files == PKI_FILES
    # Readable by the non-root server through fsGroup, by nobody else.
    mode = volume.get("projected", volume.get("secret", {})).get("defaultMode")
    assert mode is not None and mode & 0o007 == 0, oct(mode or 0)
    # The data dir itself is writable scratch (the root filesystem is read-only).
    assert "emptyDir" in volumes[mounts[args.data_dir]["name"]]


def test_pods_are_locked_down() -> None:
    spec = pod_spec()
    container = server_container()
    pod_context, context = spec["securityContext"], container["securityContext"]
    assert pod_context["runAsNonRoot"] is True and context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    for each in (pod_context, context):
        assert each["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    # The image's user is the one the pod runs as (Pod Security "restricted").
    user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert user is not None and int(user[1]) == pod_context["runAsUser"]


def test_resources_are_requested_and_limited() -> None:
    resources = server_container()["resources"]
    for kind in ("cpu", "memory"):
        request = quantity(resources["requests"][kind])
        limit = quantity(resources["limits"][kind])
        assert 0 < request <= limit, f"{kind}: request {request}, limit {limit}"
    # At least what BENCHMARKS.md measured for a fresh server plus dashboard timelines.
    assert quantity(resources["requests"]["memory"]) >= 110 * 2**20


def test_dockerfile_builds_the_package_and_runs_the_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = DOCKERFILE.read_text()
    copied = {
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE)
        for source in line.split()[:-1]
    }
    setuptools = project["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    needed = {name.split(".")[0] for name in setuptools["packages"]} - set(mapped)
    needed |= {directory.split("/")[0] for directory in mapped.values()}
    needed |= {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, f"the image misses {needed - copied}"
    assert server_container()["command"][0] in project["project"]["scripts"]
    assert "FROM python:3.11-slim" in text


def test_readme_init_names_the_headless_service_as_a_san() -> None:
    """Agents check the server certificate against the name they connect to."""
    service = headless_service()
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    readme = (DEPLOY / "README.md").read_text()
    assert f"--san {name}" in readme
    assert f"--server {name}:{port_of(serve_args().grpc)}" in readme


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
