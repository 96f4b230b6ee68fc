"""The chart's Grafana dashboard and PrometheusRule against a real Prometheus scraping a real operator.

`kubealign operator --metrics-port` runs on the local control plane (kwok plays the kubelet) while
a Prometheus built from the Go module proxy (tools/cluster build) scrapes it every second and
evaluates the chart's rules, rendered by helm with test-sized thresholds. The operator then lives
through what the dashboard and alerts are for: a stage that fails, is retried and fails its run; a
stage that waits for admission and one still waiting; reconciles the API server refuses (a
ResourceQuota). Every alert must fire, every rule must load healthy, and every panel's query must
return series from what the operator actually exported.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

import localcluster
from tests.cluster.operator_harness import OperatorProcess, Reader, submit
from tests.operator.run_builders import manifest, stage, uri
from tests.processes import answers, free_port, serving, wait_until

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubealign"
KWOK_FAIL = "kubealign.io/kwok-fail"
KWOK_EXIT_CODE = "kubealign.io/kwok-exit-code"
# Grafana's interval variables, as Grafana would fill them in for a short range at 1 s resolution.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m"}
ALERTS = {"KubealignRunFailed", "KubealignStageQueuedTooLong", "KubealignReconcileErrors"}


def binary(name: str) -> str:
    path = localcluster.BINARY_BY_NAME[name].path()
    if not path.is_file():
        pytest.fail(f"{name} is not built ({path}): run `tools/cluster build`", pytrace=False)
    return str(path)


def rendered_monitoring() -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's dashboard JSON and PrometheusRule, rendered with thresholds a test can reach."""
    sets = [
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.queuedTooLongSeconds=3",
        "monitoring.prometheusRule.reconcileErrorsWindow=1m",
        "monitoring.prometheusRule.reconcileErrorsFor=0s",
    ]
    text = subprocess.run(
        [binary("helm"), "template", "kubealign", str(CHART), *(f"--set={s}" for s in sets)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    (configmap,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return json.loads(configmap["data"]["kubealign-operator.json"]), rule


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def firing(self) -> set[str]:
        return {
            a["labels"]["alertname"] for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"
        }


@pytest.fixture
def operator_metrics_port(cluster: Cluster, namespace: str, crd: None, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    operator = OperatorProcess(cluster, namespace, tmp_path / "operator.log", f"--metrics-port={port}")
    try:
        wait_until("the operator's /metrics", lambda: answers(f"http://127.0.0.1:{port}/metrics"), timeout=60)
        yield port
    finally:
        operator.kill()


@pytest.fixture
def prometheus(operator_metrics_port: int, tmp_path: Path) -> Iterator[tuple[Prometheus, dict[str, Any]]]:
    dashboard, rule = rendered_monitoring()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    config = tmp_path / "prometheus.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "kubealign",
                        "static_configs": [{"targets": [f"127.0.0.1:{operator_metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    with serving(
        process,
        ready=lambda: answers(f"{url}/-/ready"),
        what="prometheus",
        log=log,
        start_timeout=60,
        stop_timeout=10,
    ):
        yield Prometheus(url), dashboard


def test_every_panel_and_alert_works_on_what_the_operator_exports(
    cluster: Cluster, namespace: str, prometheus: tuple[Prometheus, dict[str, Any]], reader: Reader
) -> None:
    prom, dashboard = prometheus
    groups = prom.get("/api/v1/rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == ALERTS
    wait_until(
        "Prometheus to scrape the operator", lambda: prom.query('up{job="kubealign"} == 1'), timeout=30
    )

    # A stage that fails, is retried once, and fails its run.
    crash = {KWOK_FAIL: "true", KWOK_EXIT_CODE: "3"}
    sft = stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")})
    submit(cluster, namespace, manifest([{**sft, "maxRetries": 1, "podAnnotations": crash}], name="crash"))
    # Two runs waiting for Kueue (the test plays Kueue): one is admitted, one waits on.
    for name in ("admitted", "waiting"):
        submit(cluster, namespace, manifest([sft], name=name, queueName="gpu-queue"))
    wait_until(
        "both to queue",
        lambda: all(reader.stage(n, "sft").get("phase") == "Queued" for n in ("admitted", "waiting")),
    )
    wait_until(
        "the queued-too-long alert", lambda: "KubealignStageQueuedTooLong" in prom.firing(), timeout=60
    )
    admit = '{"spec": {"suspend": false}}'
    cluster.kubectl("patch", "job", "admitted-sft-1", "-n", namespace, "--type=merge", "-p", admit)
    reader.wait_phase("admitted", "Succeeded")
    reader.wait_phase("crash", "Failed")
    # Reconciles the API server refuses: a quota that admits no more Jobs or ConfigMaps.
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "full", "namespace": namespace},
        "spec": {"hard": {"count/jobs.batch": "0", "configmaps": "0"}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(quota))
    dpo = stage("dpo", "dpo", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/prefs")})
    submit(cluster, namespace, manifest([dpo], name="refused"))

    wait_until("every alert to fire", lambda: prom.firing() >= ALERTS, timeout=90)
    failed = {
        a["labels"]["name"]
        for a in prom.get("/api/v1/alerts")["alerts"]
        if a["labels"]["alertname"] == "KubealignRunFailed"
    }
    assert failed == {"crash"}
    queued = [
        a
        for a in prom.get("/api/v1/alerts")["alerts"]
        if a["labels"]["alertname"] == "KubealignStageQueuedTooLong"
    ]
    assert [(a["labels"]["run"], a["labels"]["stage"]) for a in queued] == [("waiting", "sft")]
    for name, rule in {r["name"]: r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]}.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))

    # Every panel's query, as Grafana sends it, returns series (the rates need a few scrapes).
    def empty_panels() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in panel_queries(dashboard) if not prom.query(expr)]

    wait_until("every panel to have data", lambda: not empty_panels(), timeout=30)
    retries = prom.query('sum(kubealign_stage_retries_total{type="sft"})')
    assert float(retries[0]["value"][1]) == 1.0
    finished = prom.query('sum by (phase) (kubealign_stage_duration_seconds_count{type="sft"})')
    assert {r["metric"]["phase"]: float(r["value"][1]) for r in finished} == {"Failed": 1.0, "Succeeded": 1.0}
    # The refused creates are what the errors alert saw, by the Event's reason.
    errors = prom.query("sum by (reason) (kubealign_reconcile_errors_total)")
    assert {r["metric"]["reason"] for r in errors} == {"CreateFailed"}
