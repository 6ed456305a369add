"""The monitoring files shipped in nbd_postcopy/monitoring: the alerting rules pass `promtool check rules`
and their unit tests (`promtool test rules`), a real Prometheus loads them next to a real page server and
device, and every metric the rules and the Grafana dashboard name is one the code defines.

Depends: promtool and prometheus (Debian's `prometheus`); PyYAML for the checks that read the rule files;
nbdkit with its python plugin for the real device.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

import nbd_postcopy.monitoring
from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device.metrics import DeviceMetrics
from nbd_postcopy.source.metrics import ServerMetrics
from tests.conftest import PLUGIN, REPO, wait_for_path
from tests.servers import free_tcp_port, serve, write_image

MONITORING = Path(nbd_postcopy.monitoring.__file__).parent
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_GROUPS = {"nbd-postcopy-device", "nbd-postcopy-page-server"}
# The alerts whose unit tests must show them firing on a bad instance and silent on healthy ones.
REQUIRED_ALERTS = {"NbdPostcopySourceUnreachable", "NbdPostcopySourceRefused", "NbdPostcopyPrefetchStalled"}
SEVERITIES = {"critical", "warning"}
# Grafana's own variables, and what the dashboard's are replaced by to run its queries in Prometheus.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$instance": ".*"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def load_yaml(path: Path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges,
    numbers, grouping clauses, function names and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"(?<![\w:])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", " ", expr)  # numbers, 1.6e+07 too
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        called = expr[match.end():].lstrip().startswith("(")
        if not called and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def defined_metric_names() -> set[str]:
    """Every series name the device and the page server expose (histogram buckets and _total included)."""
    names = set()
    for registry in (DeviceMetrics().registry, ServerMetrics().registry):
        for line in generate_latest(registry).decode().splitlines():
            if line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_names_parses_promql():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(nbd_postcopy_fault_seconds_bucket'
            '{instance=~"$instance", le!="x y"}[$__rate_interval]))) > 0.05 and on (job) up == bool 1.6e+07')
    assert metric_names(expr) == {"nbd_postcopy_fault_seconds_bucket", "up"}


# --- alerting rules -----------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_silent():
    """Each alert has a unit test where it fires; the required ones also have a test where it is silent."""
    fires, silent = set(), set()
    for test in load_yaml(RULE_TESTS)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fires == set()
    assert REQUIRED_ALERTS - silent == set()
    assert REQUIRED_ALERTS <= alerts


def test_every_alert_has_severity_annotations_and_for():
    for rule in alert_rules():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= set(rule.get("annotations", {})), rule["alert"]
        assert "for" in rule, rule["alert"]
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
    assert severities["NbdPostcopySourceUnreachable"] == severities["NbdPostcopySourceRefused"] == "critical"


def test_rules_read_only_metrics_the_code_defines():
    defined = defined_metric_names()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= defined, f"{rule['alert']}: {names - defined} are not metrics of the device or server"


# --- Grafana dashboard --------------------------------------------------------------------------------


def test_dashboard_is_json_with_its_variables():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"]["uid"] == "${datasource}"
    assert set(re.findall(r"nbd_postcopy_\w+", instance["query"])) <= defined_metric_names()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    for target in dashboard_targets():
        assert target["datasource"]["uid"] == "${datasource}"
        used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
        assert used <= set(variables) | {"__rate_interval"}, target["expr"]
        assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_dashboard_reads_only_metrics_the_code_defines():
    defined = defined_metric_names()
    used = set()
    for target in dashboard_targets():
        names = metric_names(target["expr"])
        assert names and names <= defined, f"{target['expr']}: {names - defined} are not defined"
        used |= names
    wanted = {"nbd_postcopy_fault_seconds_bucket", "nbd_postcopy_pages_fetched_total", "nbd_postcopy_pages_remaining",
              "nbd_postcopy_prefetch_progress_ratio", "nbd_postcopy_source_connected",
              "nbd_postcopy_source_errors_total", "nbd_postcopy_source_refusals_total", "nbd_postcopy_anomalies_total",
              "nbd_postcopy_server_requests_total", "nbd_postcopy_server_read_bytes_total",
              "nbd_postcopy_server_clients", "nbd_postcopy_server_backlog_bytes",
              "nbd_postcopy_server_connections_refused_total"}  # fmt: skip
    assert wanted - used == set()


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def test_dashboard_queries_parse(tmp_path):
    """promtool parses each dashboard query (as a recording rule, with Grafana's variables filled in)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(t["expr"])}
             for i, t in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- packaging ----------------------------------------------------------------------------------------


def test_monitoring_files_are_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["nbd_postcopy.monitoring"]
    for path in (RULES, RULE_TESTS, DASHBOARD):
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in shipped), path.name
    assert (MONITORING / "__init__.py").is_file()


# --- a real Prometheus --------------------------------------------------------------------------------


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert answer["status"] == "success", answer
    return answer["data"]


def wait_for(predicate, timeout: float, what: str):
    """Call `predicate` until it returns something true (connection errors count as false); return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.2)


@pytest.mark.slow
def test_prometheus_loads_rules_and_scrapes_the_page_server_and_device(processes, run_dir):
    """Prometheus with the shipped rules scrapes a real `nbd-postcopy serve --metrics-listen` and a real
    plugin `metrics=`: both targets are up, both rule groups are loaded and evaluate without error, no alert
    fires on this healthy pair, every metric the rules and dashboard name is in the scrape, and every
    dashboard query runs."""
    pages = 256
    image, key = run_dir / "ram.img", run_dir / "key"
    write_image(image, pages * PAGE_SIZE)
    key.write_bytes(os.urandom(32))
    server_port, device_port, prometheus_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    with serve("nbd-postcopy", run_dir, image=image, extra=["--metrics-listen", f"127.0.0.1:{server_port}"]) as server:
        control = run_dir / "ctl.sock"
        with open(run_dir / "nbdkit.log", "wb") as log:
            device = processes.start(
                ["nbdkit", "-f", "-U", run_dir / "dev.sock", "python", PLUGIN, f"source={server.uri('unix')}",
                 f"pages={pages}", f"key={key}", f"control={control}", f"cache-dir={run_dir}",
                 f"metrics=127.0.0.1:{device_port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_path(control, proc=device)
        config = run_dir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "source", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]},
                {"job_name": "device", "static_configs": [{"targets": [f"127.0.0.1:{device_port}"]}]},
            ],
        }))  # fmt: skip
        with open(run_dir / "prometheus.log", "wb") as log:
            prometheus = processes.start(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={run_dir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            def targets_up():
                targets = api(prometheus_port, "targets")["activeTargets"]
                return len(targets) == 2 and all(t["health"] == "up" for t in targets) and targets

            def rules_evaluated():
                groups = api(prometheus_port, "rules")["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return rules and all(rule["health"] == "ok" for rule in rules) and groups

            def scraped_names():  # the buckets arrive in the same scrape as the rest of their target
                result = api(prometheus_port, "query", query='count by (__name__) ({__name__=~"nbd_postcopy_.*"})')
                names = {series["metric"]["__name__"] for series in result["result"]}
                buckets = {"nbd_postcopy_fault_seconds_bucket", "nbd_postcopy_server_request_seconds_bucket"}
                return buckets <= names and names

            targets = wait_for(targets_up, 60, "both targets up")
            assert {t["labels"]["job"] for t in targets} == {"source", "device"}
            groups = wait_for(rules_evaluated, 60, "every rule evaluated without error")
            assert {group["name"] for group in groups} == RULE_GROUPS
            assert {group["file"] for group in groups} == {str(RULES)}
            loaded = {rule["name"] for group in groups for rule in group["rules"]}
            in_file = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
            assert loaded == in_file and REQUIRED_ALERTS <= loaded
            for rule in (rule for group in groups for rule in group["rules"]):
                assert rule["type"] == "alerting" and rule["labels"]["severity"] in SEVERITIES, rule
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule

            names = wait_for(scraped_names, 30, "the device's and the server's series in Prometheus")
            used = set().union(*(metric_names(rule["query"]) for group in groups for rule in group["rules"]))
            used |= set().union(*(metric_names(t["expr"]) for t in dashboard_targets()))
            assert used - names == set(), "named by the rules or dashboard, not scraped"
            for target in dashboard_targets():
                api(prometheus_port, "query", query=grafana_to_promql(target["expr"]))  # raises unless it runs
            assert api(prometheus_port, "alerts")["alerts"] == []
        finally:
            if prometheus.poll() is None:
                prometheus.terminate()
                prometheus.wait(10)
