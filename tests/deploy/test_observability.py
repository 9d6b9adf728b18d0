"""The Grafana dashboard (deploy/grafana/), the Prometheus alert rules (deploy/prometheus-alerts.yml)
and their wiring in the Compose `metrics` profile.

Every query must name metrics the service really exports: the app is built, driven so that each of
its metrics has a sample (a recommend and an event answered 503 before any version is loaded,
one recommendation per fallback reason, one reload of each result) and GET /metrics is parsed;
label names and the fixed label values a query matches on are checked the same way. Queries are
then parsed by `promtool` (Debian's `prometheus` package, installed by .ci/run), which also runs
the alerts' unit tests (prometheus_alerts_test.yml); without promtool those tests skip and say so.
No Grafana runs here: no registry this project may use ships a Grafana server (Debian does not
package it), so the dashboard is checked as data.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.metrics import STAGES
from service.recommend import STORE_FLAG

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "recsys.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS = Path(__file__).with_name("prometheus_alerts_test.yml")
# series Prometheus makes itself, not the service
PROMETHEUS_OWN = {"up": {"job", "instance"}}
# labels every scraped series carries (added by the scrape job), and `le` of histogram buckets
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
# Metrics a query may name before the service exports them (issue 23 adds them): their panels stay
# empty and their rules never fire until then. Once exported they are checked like the rest (their
# labels too); an entry here can then go.
PENDING = {
    "recsys_version_drift": "issue 23: 1 while a worker serves another version than CURRENT names",
    "recsys_store_bytes": "issue 23: bytes held by the in-process store (RECSYS_MAX_STORE_BYTES)",
}
# Grafana's variables in a query, replaced by values Prometheus accepts before promtool parses it
GRAFANA_VARS = {"$__rate_interval": "1m", "$job": ".*"}
METRIC = re.compile(r"\b(recsys_\w+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b(recsys_\w+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
# labels with a fixed set of values, checked when a query matches one exactly (ids, versions and
# statuses are open)
FIXED_VALUES = {"route", "stage", "reason", "result"}
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


# ---------------------------------------------------------------- what the service exports


@functools.cache
def exposition() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values GET /metrics of the real app shows, after driving
    it (no version loaded)."""
    app = create_app()
    client = TestClient(app)  # no lifespan: nothing loaded, these answer 503 (route labels by the middleware)
    assert client.post("/v1/recommend", json={"user_id": "u1", "k": 5}).status_code == 503
    assert client.post("/v1/events", json={"user_id": "u1", "item_id": "i1"}).status_code == 503
    m = app.state.metrics
    # plain popularity is the no-history case; the flags are the pipeline's (service/recommend.py)
    for served_by in ("rerank", "popularity", f"popularity;{STORE_FLAG}", "popularity;timeout"):
        m.observe_recommendation(served_by, {stage: 1.0 for stage in STAGES}, unknown_items=1)
    for result in ("ok", "failed"):  # the reloader's two results (service/reloader.py)
        m.reloads.labels(result).inc()
    m.set_version("v1")
    m.observe_store(evictions=3, users=2)
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            labels = samples.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return samples


def exported() -> dict[str, set[str]]:
    """Sample name -> its label names."""
    return {name: set(labels) for name, labels in exposition().items()}


# ---------------------------------------------------------------- the queries


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and query variable."""
    found = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":  # label_values(metric, label): a Grafana function, not PromQL
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            found.append((f"variable {v['name']}", f"count by ({m[2]}) ({m[1]})"))
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def problems(where: str, expr: str) -> list[str]:
    """What in one query does not match the exported metrics: unknown names, label names or values."""
    out = []
    names = set(METRIC.findall(expr))
    if not names:
        out.append(f"{where}: names no metric: {expr}")
    known = exported() | PROMETHEUS_OWN
    for name in names:
        if name not in known and name not in PENDING:
            out.append(f"{where}: {name} is not exported by GET /metrics")
    for name, matchers in SELECTOR.findall(expr):
        labels = known.get(name, TARGET_LABELS)
        for label, op, value in MATCHER.findall(matchers):
            if label not in labels | TARGET_LABELS:
                out.append(f"{where}: {name} has no label {label!r} (it has {sorted(labels)})")
            allowed = exposition().get(name, {}).get(label)
            if op in ("=", "!=") and label in FIXED_VALUES and allowed is not None and value not in allowed:
                out.append(f"{where}: {name}{{{label}={value!r}}} matches no value the service writes {sorted(allowed)}")
    all_labels = set().union(*(known.get(n, set()) for n in names)) | TARGET_LABELS | {"le"}
    for group in GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in all_labels:
                out.append(f"{where}: groups by {label!r}, a label none of {sorted(names)} has")
    return out


# ---------------------------------------------------------------- dashboard


def test_dashboard_queries_use_exported_metrics_and_labels() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    found = [p for where, expr in queries for p in problems(where, expr)]
    assert not found, "\n".join(found)


def test_query_checker_catches_a_wrong_name_label_and_value() -> None:
    # the checker itself: each kind of mistake is reported
    assert problems("t", "rate(recsys_requests_total[5m])") == ["t: recsys_requests_total is not exported by GET /metrics"]
    assert problems("t", 'rate(recsys_fallbacks_total{stage="x"}[5m])')[0].startswith("t: recsys_fallbacks_total has no label 'stage'")
    assert "matches no value" in problems("t", 'rate(recsys_fallbacks_total{reason="store_down"}[5m])')[0]
    assert "matches no value" in problems("t", 'rate(recsys_http_errors_total{route="/recommend"}[5m])')[0]
    assert "groups by 'reason'" in problems("t", "sum by (reason) (rate(recsys_reloads_total[5m]))")[0]
    assert not problems("t", "max(recsys_version_drift)")  # pending
    assert "has no label 'stage'" in problems("t", 'max(recsys_version_drift{stage="x"})')[0]


def test_dashboard_covers_every_exported_metric_and_the_asked_views() -> None:
    text = " ".join(expr for _, expr in dashboard_queries())
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported()}
    missing = sorted(f for f in families | set(PENDING) if f not in text)
    assert not missing, f"exported but on no panel: {missing}"
    titles = " | ".join(p["title"] for p in panels())
    # request rate, latency percentiles by stage, fallbacks, reloads, store health, evictions
    for words in ("Requests / s", "Stage latency p99", "Fallbacks / s by reason", "Reloads", "Store failures",
                  "Evictions"):
        assert words in titles, f"no panel {words!r} in {titles}"
    stage_panel = next(p for p in panels() if p["title"] == "Stage latency p99")
    assert "histogram_quantile(0.99" in stage_panel["targets"][0]["expr"]
    assert "by (stage, le)" in stage_panel["targets"][0]["expr"]


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["uid"] == "recsys-api" and d["schemaVersion"] >= 36 and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == source["type"]
    assert variables["datasource"]["current"]["value"] == source["uid"]
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{p['title']}: wider than the grid"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert re.search(r'\{job=~"\$job"', t["expr"]), f"{p['title']}: not filtered by $job"
            if "[" in t["expr"]:
                assert "[$__rate_interval]" in t["expr"], f"{p['title']}: a fixed rate window"


# ---------------------------------------------------------------- alert rules


def test_alert_rules_use_exported_metrics() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"RecsysHigh5xxRate", "RecsysRecommendP99High", "RecsysFallbackRateHigh",
                                          "RecsysReloadFailed", "RecsysReplicasServeDifferentVersions",
                                          "RecsysVersionBehindCurrent"}
    found = [p for r in rules for p in problems(f"alert {r['alert']}", r["expr"])]
    assert not found, "\n".join(found)
    for r in rules:
        assert r["labels"]["severity"] in ("page", "warn") and r["annotations"]["summary"], r["alert"]


# ---------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("no promtool on PATH (Debian: apt-get install prometheus; .ci/run installs it)")
    return exe


def _promtool(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_checks_the_rules_and_the_compose_prometheus_config(promtool: str) -> None:
    rules = _promtool(promtool, "check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = _promtool(promtool, "check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout  # the alerts are loaded by the Compose Prometheus


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    proc = _promtool(promtool, "test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {r["alert"] for r in alert_rules()}, "an alert without a unit test"


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    """Each query as a recording rule, Grafana's variables replaced: promtool parses the PromQL."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: a Grafana variable promtool cannot parse: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _promtool(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and a broken query is refused, so the check is real
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum by (le (x)"}]}]}))
    assert _promtool(promtool, "check", "rules", str(path)).returncode != 0


# ---------------------------------------------------------------- Compose wiring


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> repository path of a service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *_ = v.split(":")
        if src.startswith("./"):
            assert (ROOT / src).exists(), f"{src} is mounted but not in the repository"
            out[dst] = src
    return out


def test_compose_metrics_profile_provisions_alerts_and_the_dashboard() -> None:
    svc = _compose()["services"]
    prom, graf = svc["prometheus"], svc["grafana"]
    assert prom["profiles"] == graf["profiles"] == ["metrics"]
    # Prometheus loads the alert rules named by its config, mounted beside it
    pmounts = _mounts(prom)
    config_in = next(dst for dst, src in pmounts.items() if src == "./deploy/prometheus.yml")
    rule_files = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"]
    for rel in rule_files:
        assert pmounts.get(str(Path(config_in).parent / rel)) == f"./deploy/{rel}"
    assert "./deploy/prometheus-alerts.yml" in pmounts.values()
    # Grafana: provisioning folder, the dashboard folder the provider reads, the Prometheus it queries
    gmounts = _mounts(graf)
    assert gmounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/recsys.yml").read_text())["providers"][0]
    assert gmounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / gmounts[str(Path(home).parent)] / Path(home).name).resolve() == DASHBOARD
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host == "prometheus" and host in graf["depends_on"]
    assert any(p.endswith(f":{port}") for p in prom["ports"])
    assert graf["ports"][0].startswith("${GRAFANA_BIND:-127.0.0.1}:")  # loopback by default, as the API
