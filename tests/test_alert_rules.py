"""The Prometheus alerting rules and the Grafana dashboard in deploy/: valid, unit-tested,
and written against metric names the server really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from control.metrics import Metrics
from tests.conftest import missing_tool
from tests.test_metrics import idle_plane

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "killswitch-dashboard.json"
# Series Prometheus itself adds to every scrape.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
DATASOURCE = "${DS_PROMETHEUS}"
# The alerts every deployment relies on; the runbooks/ directory will be written for them.
ALERTS = {
    "KillswitchCaptureViolation": "critical",
    "KillswitchEventsAcceptedAfterPause": "critical",
    "KillswitchAgentsOverdue": "warning",
    "KillswitchFleetNotCompliant": "critical",
    "KillswitchControlPlaneDown": "critical",
    "KillswitchControlPlaneAbsent": "critical",
    "KillswitchReplicaNotLeasing": "critical",
    "KillswitchAgentsDisconnected": "warning",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_tool("promtool is not installed: run scripts/test-tools.sh (`make test` does)")
    return path


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_alerting_rules_are_valid() -> None:
    out = run_promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(ALERTS)} rules found" in out


def test_alerting_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def test_example_prometheus_config_is_valid() -> None:
    run_promtool("check", "config", "prometheus.yml")


# ---------------------------------------------------------------- metric names

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (no parser: enough for our own files)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(a_bucket{x="y", z=~"$i"}'
        "[$__rate_interval]))) / on (job) group_left b_total offset 5m and c > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def exposed_names() -> set[str]:
    """Every series name the server's /metrics can show, from its registry's families."""
    metrics = Metrics()
    metrics.watch(idle_plane())  # its census is all zeros
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "summary": ["", "_count", "_sum", "_created"],
        "info": ["_info"],
    }
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def test_exposed_names_follow_conventions() -> None:
    names = exposed_names()
    assert {
        "killswitch_agents",
        "killswitch_agents_by_mode",
        "killswitch_connected_streams",
        "killswitch_epoch",
        "killswitch_active_holds",
        "killswitch_leasing",
        "killswitch_view_age_seconds",
        "killswitch_agents_label_mismatch",
        "killswitch_pause_to_ack_seconds_bucket",
        "killswitch_pause_to_verified_seconds_bucket",
        "killswitch_directives_sent_total",
        "killswitch_acks_total",
        "killswitch_nacks_total",
        "killswitch_violations_total",
        "killswitch_agent_reconnects_total",
        "killswitch_upload_authorizations_refused_total",
        "killswitch_grpc_server_handled_total",
        "killswitch_grpc_server_handling_seconds_bucket",
        "process_cpu_seconds_total",
        "python_info",
    } <= names
    ours = {n for n in names if n.startswith("killswitch_")}
    assert all(re.fullmatch(r"killswitch_[a-z_]+", n) for n in ours), ours


def alert_rules() -> list[dict[str, Any]]:
    """The rules of alerts.yml, read with a few lines of YAML (the file is ours, and
    promtool checks it properly): each rule's alert, expr, labels and annotations keys."""
    rules: list[dict[str, Any]] = []
    lines = (PROMETHEUS / "alerts.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.strip().removeprefix("- ").partition(":")
        rest = rest.strip()
        if key == "alert":
            rules.append({"alert": rest, "labels": {}, "text": []})
        elif key == "expr" and rules:
            if rest in ("|", ">", "|-", ">-"):
                indent = len(line) - len(line.lstrip())
                block = []
                for following in lines[i + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following)
                rest = "\n".join(block)
            rules[-1]["expr"] = rest
        elif key == "severity" and rules:
            rules[-1]["labels"]["severity"] = rest
        elif key in ("summary", "description", "runbook_url") and rules:
            rules[-1]["text"].append(key)
    return rules


def test_alerts_use_exposed_metrics_and_say_what_to_do() -> None:
    rules = alert_rules()
    assert {r["alert"]: r["labels"].get("severity") for r in rules} == ALERTS
    known = exposed_names() | SYNTHETIC
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used, rule
        assert used <= known, f"{rule['alert']} uses unknown metrics {used - known}"
        assert {"summary", "description", "runbook_url"} <= set(rule["text"]), rule["alert"]
    text = (PROMETHEUS / "alerts.yml").read_text()
    runbooks = set(re.findall(r"runbook_url: (\S+)", text))
    assert runbooks and all(re.fullmatch(r"runbooks/[a-z-]+\.md", r) for r in runbooks), runbooks


# ---------------------------------------------------------------- Grafana


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def test_grafana_dashboard_shows_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = exposed_names() | SYNTHETIC
    shown: set[str] = set()
    kinds = set()
    for panel in panels:
        kinds.add(panel["type"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            used = metric_names(target["expr"])
            assert used, f"{panel['title']}: no metric in {target['expr']!r}"
            assert used <= known, f"{panel['title']}: unknown metrics {used - known}"
            shown |= used
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == DATASOURCE
            assert metric_names(annotation["expr"]) <= known
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE
        selector = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])
        assert selector and metric_names(selector[1]) <= known, variable["definition"]
    assert {"stat", "timeseries"} <= kinds
    # Every metric of our own is on the dashboard somewhere.
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in shown}
    ours = {n.removesuffix("_total") for n in known if n.startswith("killswitch_")}
    ours = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in ours}
    assert ours <= families, f"not on the dashboard: {ours - families}"
    assert "histogram_quantile" in DASHBOARD.read_text()
