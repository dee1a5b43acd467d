"""Prometheus scrape config and alert rules, Grafana provisioning and dashboard (docker/).

`promtool` does not run here, so: the YAML is parsed, the scrape target is checked against the
compose service, and every PromQL expression (alerts and dashboard panels) is parsed with a real
PromQL parser and checked against the metrics the service actually defines (service/metrics.py):
metric names, and the label names used in matchers and `by (...)` clauses.
"""

from __future__ import annotations

import json
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service import metrics as service_metrics

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
GRAFANA_DIR = DOCKER / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "mml-recall.json"
SERVICE_PORT = 8000
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "service", "le"}
# Series of Prometheus itself that the rules may use.
BUILTIN_SERIES = {"up": set()}
# Grafana's variables, replaced by values of their kind before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$arm": ".*"}


def _service_series() -> dict[str, set[str]]:
    """Every series name the service exports -> its label names."""
    series: dict[str, set[str]] = {}
    for metric in vars(service_metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        for family in metric.describe():
            if family.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    series[family.name + suffix] = labels | {"le"} if suffix == "_bucket" else labels
            elif family.type == "counter":
                series[family.name + "_total"] = labels
            else:
                series[family.name] = labels
    return series


SERIES = {**_service_series(), **BUILTIN_SERIES}


def _selectors_and_groupings(expr: str) -> tuple[list[promql_parser.VectorSelector], set[str]]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    ast = promql_parser.parse(expr)  # raises ValueError on a syntax error
    selectors: list[promql_parser.VectorSelector] = []
    grouping: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)

    promql_parser.walk(ast, visit)
    return selectors, grouping


def _check_expr(expr: str) -> set[str]:
    """Parse one PromQL expression and check it against the exported series; returns the names."""
    selectors, grouping = _selectors_and_groupings(expr)
    assert selectors, f"no series in {expr!r}"
    names = set()
    available = set(TARGET_LABELS)
    for selector in selectors:
        assert selector.name in SERIES, f"{selector.name!r} is not exported by service/metrics.py ({expr!r})"
        names.add(selector.name)
        labels = SERIES[selector.name] | TARGET_LABELS
        available |= labels
        for matcher in selector.matchers.matchers:
            assert matcher.name in labels, f"{selector.name} has no label {matcher.name!r} ({expr!r})"
    assert grouping <= available, f"grouping by unknown labels {grouping - available} in {expr!r}"
    return names


def test_the_checker_rejects_bad_queries() -> None:
    """The checks below can fail: a syntax error, an unknown series and an unknown label are caught."""
    with pytest.raises(ValueError):
        _check_expr("sum by (arm (rate(mml_recall_requests_total[5m]))")
    with pytest.raises(AssertionError, match="not exported"):
        _check_expr("rate(mml_recall_request_latency_bucket[5m])")
    with pytest.raises(AssertionError, match="no label"):
        _check_expr('rate(mml_recall_stage_seconds_bucket{arm="mml"}[5m])')
    with pytest.raises(AssertionError, match="grouping"):
        _check_expr("sum by (user_id) (rate(mml_recall_requests_total[5m]))")


# --- Prometheus --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


def test_scrape_targets_the_compose_service(prometheus: dict) -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    job = jobs["mml-recall"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.split(":")
    assert host in compose["services"], f"scrape target {host} is not a compose service"
    assert int(port) == SERVICE_PORT
    assert prometheus["global"]["scrape_timeout"] < prometheus["global"]["scrape_interval"]


def test_rule_files_exist(prometheus: dict) -> None:
    for name in prometheus["rule_files"]:
        assert (PROMETHEUS_DIR / name).is_file(), name


def test_alert_rules_are_valid_promql_on_exported_series(prometheus: dict) -> None:
    alerts = set()
    for name in prometheus["rule_files"]:
        for group in yaml.safe_load((PROMETHEUS_DIR / name).read_text())["groups"]:
            for rule in group["rules"]:
                _check_expr(rule["expr"])
                assert rule["labels"]["severity"] in {"page", "ticket"}
                assert rule["annotations"]["summary"]
                assert rule["for"].endswith(("s", "m", "h"))
                alerts.add(rule["alert"])
    assert {"MMLRecallDown", "MMLRecallP99High", "MMLRecallErrorRatio", "MMLRedisErrors"} <= alerts


# --- Grafana -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _datasource() -> dict:
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    (datasource,) = provisioning["datasources"]
    return datasource


def _targets(dashboard: dict):
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel, target


def test_datasource_points_at_the_compose_prometheus(prometheus: dict) -> None:
    datasource = _datasource()
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_dashboard_provider_loads_the_mounted_folder() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = {
        volume.split(":")[1]: volume.split(":")[0] for volume in compose["services"]["grafana"]["volumes"]
    }
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "mml-recall.yaml").read_text())
    (entry,) = provider["providers"]
    path = entry["options"]["path"]
    assert (DOCKER / mounts[path]).resolve() == DASHBOARD.parent


def test_dashboard_panels_use_the_provisioned_datasource(dashboard: dict) -> None:
    uid = _datasource()["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel, target in _targets(dashboard):
        assert panel["datasource"]["uid"] == uid and target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_dashboard_queries_are_valid_promql_on_exported_series(dashboard: dict) -> None:
    used = set()
    for _, target in _targets(dashboard):
        used |= _check_expr(target["expr"])
    for variable in dashboard["templating"]["list"]:
        series, label = variable["definition"].removeprefix("label_values(").removesuffix(")").split(", ")
        assert label in SERIES[series]
    # the brief's four metrics are all on the dashboard
    expected = {
        "mml_recall_request_seconds_bucket",
        "mml_recall_stage_seconds_bucket",
        "mml_recall_requests_total",
        "mml_redis_errors_total",
    }
    assert expected <= used


def test_dashboard_shows_latency_quantiles_by_arm(dashboard: dict) -> None:
    quantiles = set()
    for _, target in _targets(dashboard):
        expr = target["expr"]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        ast = promql_parser.parse(expr)
        if isinstance(ast, promql_parser.Call) and ast.func.name == "histogram_quantile":
            selectors, grouping = _selectors_and_groupings(expr)
            if {s.name for s in selectors} == {"mml_recall_request_seconds_bucket"} and "arm" in grouping:
                quantiles.add(ast.args[0].val)
    assert {0.5, 0.95, 0.99} <= quantiles
