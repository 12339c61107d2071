"""deploy/kubernetes, checked against the code it deploys.

Every flag the manifest passes exists (the real argparse parsers), the probes hit the
port and paths the server serves, the Services select the Deployment's pods and expose
its ports, and the PKI is mounted where ``serve`` reads it. No cluster is needed:
``kubectl kustomize`` runs only when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from pathlib import PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml

from control import pki
from control.metrics import Metrics
from control.web import WebServer
from tests.deploy_support import DEPLOY
from tests.deploy_support import DOCKERFILE
from tests.deploy_support import KUBERNETES
from tests.deploy_support import MANIFEST
from tests.deploy_support import ROOT
from tests.deploy_support import parse_as
from tests.deploy_support import port_of
from tests.deploy_support import quantity
from tests.deploy_support import selects

# What a replica needs, and never the root key.
PKI_FILES = set(pki.REPLICA_FILES)


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
