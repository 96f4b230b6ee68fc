"""The chart's tenancy policy on the real API server, and the operator's twin of it.

The chart's ValidatingAdmissionPolicy (charts/kubealign/templates/tenancypolicy.yaml), rendered with
`helm template` from tenancy values and applied to the local control plane, refuses each case
naming the field; kubealign.tenancy, given the same values as the chart gives the operator
(KUBEALIGN_TENANCY_POLICY), refuses exactly the same cases at the same field.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import yaml

import localcluster
from kubealign.tenancy import ENV_POLICY, TenancyPolicy
from tests.operator.run_builders import manifest, stage, uri

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster

CHART = localcluster.REPO_ROOT / "charts" / "kubealign"
VALUES = [
    "tenancy.allowedImagePrefixes={ghcr.io/kubealign/}",
    "tenancy.allowedServiceAccounts={trainer}",
    "tenancy.allowedPriorityClasses={batch-low,batch-high}",
    "tenancy.allowedTolerationKeys={nvidia.com/gpu}",
]
IMAGE = "ghcr.io/kubealign/kubealign-trainer:0.1.0"
APPARMOR = "container.apparmor.security.beta.kubernetes.io/trainer"


def sft(**fields: Any) -> dict[str, Any]:
    return stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}, **fields)


def dpo(**fields: Any) -> dict[str, Any]:
    return stage("dpo", "dpo", inputs={"model": {"from": "sft"}, "data": uri("s3://d00/prefs")}, **fields)


# (id, spec fields, stages, the field the refusal names; None: allowed)
CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]], str | None]] = [
    ("allowed", {"serviceAccountName": "trainer", "priorityClassName": "batch-low"},
     [sft(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
          podAnnotations={"prometheus.io/scrape": "true"})], None),
    ("image-from-elsewhere", {"image": "docker.io/evil/miner:1"}, [sft()], "spec.image"),
    ("stage-image-from-elsewhere", {}, [sft(), dpo(image="evil.example/x:1")], "spec.stages[1].image"),
    ("service-account", {"serviceAccountName": "cluster-admin-sa"}, [sft()], "spec.serviceAccountName"),
    ("priority-class", {"priorityClassName": "system-node-critical"}, [sft()], "spec.priorityClassName"),
    ("blanket-toleration", {}, [sft(), dpo(tolerations=[{"operator": "Exists"}])],
     "spec.stages[1].tolerations"),
    ("toleration-key", {},
     [sft(tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}])],
     "spec.stages[0].tolerations"),
    ("apparmor-unconfined", {"podAnnotations": {APPARMOR: "unconfined"}}, [sft()],
     f"spec.podAnnotations[{APPARMOR}]"),
    ("stage-annotation", {}, [sft(podAnnotations={"seccomp.security.alpha.kubernetes.io/pod": "unconfined"})],
     "spec.stages[0].podAnnotations"),
]  # fmt: skip


def render(namespace: str, *extra: str) -> list[dict[str, Any]]:
    helm = localcluster.BINARY_BY_NAME["helm"].path()
    sets = [f"--set={value}" for value in (*VALUES, f"watchNamespaces={{{namespace}}}", *extra)]
    out = subprocess.run(
        [str(helm), "template", "kubealign", str(CHART), f"--namespace={namespace}", *sets],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture
def tenancy_policy(cluster: Cluster, crd: None, namespace: str) -> Iterator[TenancyPolicy]:
    documents = render(namespace)
    policy = [
        doc
        for doc in documents
        if doc["kind"].startswith("ValidatingAdmissionPolicy") and "tenancy" in doc["metadata"]["name"]
    ]
    assert len(policy) == 2, "the chart renders a tenancy policy and its binding"
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(doc) for doc in policy))
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    env = {
        item["name"]: item.get("value")
        for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    try:
        yield TenancyPolicy.from_env({ENV_POLICY: env[ENV_POLICY]})
    finally:
        for doc in policy:
            cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found")


def server_verdict(cluster: Cluster, namespace: str, body: dict[str, Any]) -> str:
    result = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(body), check=False
    )
    return "" if result.returncode == 0 else result.stderr


@pytest.mark.parametrize("example", CASES, ids=[c[0] for c in CASES])
def test_the_tenancy_policy_refuses_at_admission_and_in_the_operator_naming_the_field(
    cluster: Cluster, namespace: str, tenancy_policy: TenancyPolicy, example: tuple[Any, ...]
) -> None:
    case, spec, stages, field = example
    body = manifest(stages, name=case, namespace=namespace, **{"image": IMAGE, **spec})
    body["metadata"] = {"name": case}
    # A new policy takes effect once the API server has compiled it: wait for the verdict to settle.
    deadline = time.monotonic() + 30
    while True:
        refused = server_verdict(cluster, namespace, body)
        if field is None or "tenancy" in refused or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    violations = tenancy_policy.violations(body)
    if field is None:
        assert refused == "" and violations == []
        return
    assert "tenancy.kubealign.io" in refused and f"denied request: {field}" in refused, refused
    assert violations and violations[0].path.startswith(field), violations


def test_the_policy_binds_only_the_namespaces_the_release_serves(
    cluster: Cluster, namespace: str, tenancy_policy: TenancyPolicy
) -> None:
    body = manifest([sft()], name="elsewhere", namespace="default", image="docker.io/evil/miner:1")
    body["metadata"] = {"name": "elsewhere"}
    time.sleep(2)
    assert "tenancy" not in server_verdict(cluster, "default", body)
