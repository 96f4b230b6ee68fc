"""The Helm chart: lint, rendering in both RBAC modes, copies in sync, and a real install.

Rendering tests need only the helm binary (built by ``tools/cluster build``); the ``cluster`` tests
send the rendered objects to the local kube-apiserver (server-side dry run) and install the chart.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import localcluster
import sync_chart
from kubealign import crdgen, defaults, fit, tenancy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubealign"
RULES = ROOT / "operator" / "kubealign" / "rbac" / "rules.yaml"
LEASE_RULES = RULES.with_name("leader-election-rules.yaml")
# Offline commands (template, lint) check Chart.yaml's kubeVersion against this; say the version the
# local control plane runs rather than the helm build's fallback default.
KUBE_VERSION = f"--kube-version={localcluster.BINARY_BY_NAME['kube-apiserver'].version()}"


@pytest.fixture(scope="session")
def helm() -> str:
    path = localcluster.BINARY_BY_NAME["helm"].path()
    if not path.is_file():
        pytest.fail(f"helm is not built ({path}): run `tools/cluster build`", pytrace=False)
    return str(path)


def run_helm(helm: str, *args: str, cluster: Any = None) -> str:
    command = [helm, *args]
    if cluster is not None:
        command += [f"--kubeconfig={cluster.kubeconfig}", f"--kube-context={cluster.context}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def render(
    helm: str, *sets: str, namespace: str = "kubealign-system", crds: bool = False
) -> list[dict[str, Any]]:
    args = ["template", "kubealign", str(CHART), f"--namespace={namespace}", KUBE_VERSION]
    args += [f"--set={item}" for item in sets]
    if crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(run_helm(helm, *args)) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


# ---------------------------------------------------------------------------------------------------------
# One source of truth


def test_chart_copies_match_their_sources() -> None:
    assert sync_chart.stale() == [], "run tools/sync_chart.py"


def test_sync_check_notices_a_drifted_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, copy = tmp_path / "rules.yaml", tmp_path / "chart" / "files" / "rbac-rules.yaml"
    source.write_text("rules: []\n")
    copy.parent.mkdir(parents=True)
    copy.write_text("rules: [] # edited in the chart only\n")
    monkeypatch.setattr(sync_chart, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(sync_chart, "CHART", tmp_path / "chart")
    monkeypatch.setattr(sync_chart, "pairs", lambda: [(source, copy)])
    assert sync_chart.stale() == ["chart/files/rbac-rules.yaml: differs from rules.yaml"]


def test_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    with (ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == version
    assert chart["appVersion"] == version


# ---------------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}",), ("metrics.enabled=false",)])
def test_helm_lint_is_clean(helm: str, sets: tuple[str, ...]) -> None:
    output = run_helm(helm, "lint", "--strict", KUBE_VERSION, str(CHART), *(f"--set={item}" for item in sets))
    assert "0 chart(s) failed" in output


def test_offline_template_and_lint_need_no_kube_version(helm: str) -> None:
    """helm is stamped with its client-go's Kubernetes version, which meets the chart's kubeVersion."""
    docs = [doc for doc in yaml.safe_load_all(run_helm(helm, "template", "kubealign", str(CHART))) if doc]
    assert only(docs, "Deployment")["metadata"]["name"] == "kubealign"
    assert "0 chart(s) failed" in run_helm(helm, "lint", "--strict", str(CHART))


def test_the_chart_installs_the_generated_admission_policy(helm: str) -> None:
    docs = render(helm, "tenancy.enabled=false")
    policy = only(docs, "ValidatingAdmissionPolicy")
    binding = only(docs, "ValidatingAdmissionPolicyBinding")
    generated = list(yaml.safe_load_all(crdgen.policy_text()))
    for rendered, source in zip((policy, binding), generated, strict=True):
        assert rendered["spec"] == source["spec"]
        assert rendered["metadata"]["name"] == source["metadata"]["name"]
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    off = render(helm, "admissionPolicy.enabled=false", "tenancy.enabled=false")
    assert not by_kind(off, "ValidatingAdmissionPolicy") and not by_kind(
        off, "ValidatingAdmissionPolicyBinding"
    )


def test_deployment_is_highly_available_hardened_and_probed(helm: str) -> None:
    docs = render(helm)
    deployment = only(docs, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one leading: a rolling update starts the new pod before the old one stops.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/kubealign/kubealign-operator:0.1.0"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert {"--health-address=0.0.0.0:8081", "--workers=16", "--leader-elect"} <= set(container["args"])
    assert "--leader-election-name=kubealign" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"health": 8080, "ready": 8081, "metrics": 9090}
    # The Lease is in the operator's own namespace, which the pod learns from the downward API.
    assert container["env"][0] == {
        "name": "POD_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }
    labels = deployment["metadata"]["labels"]
    assert labels["helm.sh/chart"] == "kubealign-0.1.0"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["app.kubernetes.io/version"] == "0.1.0"
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_a_disruption_budget_keeps_one_replica_and_never_blocks_a_drain(helm: str) -> None:
    docs = render(helm)
    budget = only(docs, "PodDisruptionBudget")
    selector = only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert budget["spec"] == {
        "minAvailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": selector},
    }
    single = render(helm, "replicaCount=1", "leaderElection.enabled=false")
    assert by_kind(single, "PodDisruptionBudget") == []
    deployment = only(single, "Deployment")["spec"]
    assert (deployment["replicas"], deployment["strategy"]) == (1, {"type": "Recreate"})
    assert "affinity" not in deployment["template"]["spec"]
    args = operator_container(single)["args"]
    assert not any(arg.startswith("--leader-elect") for arg in args)
    assert by_kind(single, "Role") == []


def test_two_replicas_without_leader_election_are_refused(helm: str) -> None:
    command = [helm, "template", "kubealign", str(CHART), KUBE_VERSION, "--set=leaderElection.enabled=false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "replicaCount > 1 needs leaderElection.enabled" in result.stderr


def test_metrics_service_selects_the_operator(helm: str) -> None:
    docs = render(helm)
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert "--metrics-port=9090" in operator_container(docs)["args"]


def test_metrics_can_be_turned_off(helm: str) -> None:
    docs = render(helm, "metrics.enabled=false")
    assert by_kind(docs, "Service") == []
    container = operator_container(docs)
    assert not any(arg.startswith("--metrics-port") for arg in container["args"])
    assert [port["name"] for port in container["ports"]] == ["health", "ready"]


def test_values_reach_the_operator(helm: str) -> None:
    container = operator_container(
        render(
            helm,
            "verbose=true",
            "image.tag=dev",
            "health.port=8181",
            "s3.endpoint=http://minio.storage:9000",
            "s3.credentialsSecret=team-s3",
            "defaultTrainerImage=ghcr.io/team/trainer:1.2",
            "gpuMemory=40Gi",
            "kueue.enabled=true",
            "kueue.defaultQueueName=team-gpus",
        )
    )
    assert "--verbose" in container["args"] and "--kueue" in container["args"]
    assert "--liveness=http://0.0.0.0:8181/healthz" in container["args"]
    assert container["image"].endswith(":dev")
    # The names the operator reads (kubealign.defaults); unset values set nothing.
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert env == {
        defaults.ENV_IMAGE: "ghcr.io/team/trainer:1.2",
        defaults.ENV_ENDPOINT: "http://minio.storage:9000",
        defaults.ENV_SECRET: "team-s3",
        defaults.ENV_GPU_MEMORY: "40Gi",
        defaults.ENV_QUEUE_NAME: "team-gpus",
        tenancy.ENV_POLICY: env[tenancy.ENV_POLICY],
    }
    # The chart's default tenancy: any image, account, priority and toleration key; no blanket
    # toleration; pod annotations from a few common prefixes.
    policy = tenancy.TenancyPolicy.from_env(env)
    assert policy == tenancy.TenancyPolicy(
        allow_blanket_tolerations=False,
        annotation_prefixes=(
            "kubealign.io/", "prometheus.io/", "fluentbit.io/",
            "cluster-autoscaler.kubernetes.io/", "karpenter.sh/",
        ),
    )  # fmt: skip
    # What the operator makes of the rendered env: the image fills a run that names none.
    installed = defaults.InstallDefaults.from_env(env)
    assert installed.image == "ghcr.io/team/trainer:1.2"
    assert installed.apply({"spec": {}})["spec"]["queueName"] == "team-gpus"
    assert installed.apply({"spec": {"queueName": "mine"}})["spec"]["queueName"] == "mine"
    assert fit.parse_memory(installed.gpu_memory) == 40 * 2**30
    plain = operator_container(render(helm, "tenancy.enabled=false"))
    assert "--verbose" not in plain["args"] and "--kueue" not in plain["args"]
    assert plain["env"][1:] == [{"name": defaults.ENV_GPU_MEMORY, "value": "80Gi"}]  # the chart's default
    bare = operator_container(render(helm, "gpuMemory=", "tenancy.enabled=false"))
    assert [item["name"] for item in bare["env"]] == ["POD_NAMESPACE"]


def test_default_trainer_image_alone_sets_only_its_variable(helm: str) -> None:
    container = operator_container(render(helm, "defaultTrainerImage=trainer:2", "tenancy.enabled=false"))
    assert container["env"][1:] == [
        {"name": defaults.ENV_GPU_MEMORY, "value": "80Gi"},
        {"name": defaults.ENV_IMAGE, "value": "trainer:2"},
    ]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["defaultTrainerImage"] == "", "no image is assumed unless the platform team sets one"


def test_crd_ships_unchanged(helm: str) -> None:
    rendered = only(render(helm, crds=True), "CustomResourceDefinition")
    source = yaml.safe_load((ROOT / "crds" / "alignmentruns.kubealign.io.yaml").read_text())
    assert rendered == source


# ---------------------------------------------------------------------------------------------------------
# RBAC: the operator's rules, bound cluster-wide or per namespace


def operator_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    assert isinstance(rules, list) and rules, f"{RULES} must be a non-empty list of PolicyRules"
    return rules


def assert_leader_election_role(docs: list[dict[str, Any]], account: str, namespace: str) -> None:
    """Only the Lease, only in the operator's namespace: the one Role and RoleBinding there."""
    (role,) = [doc for doc in by_kind(docs, "Role") if doc["metadata"]["namespace"] == namespace]
    assert role["metadata"]["name"] == "kubealign-leader-election"
    assert role["rules"] == yaml.safe_load(LEASE_RULES.read_text())
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    (binding,) = [doc for doc in by_kind(docs, "RoleBinding") if doc["metadata"]["namespace"] == namespace]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]


def test_cluster_wide_mode_binds_one_cluster_role(helm: str) -> None:
    docs = render(helm)
    role = only(docs, "ClusterRole")
    assert role["rules"] == operator_rules()
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kubealign",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubealign", "namespace": "kubealign-system"}
    ]
    assert_leader_election_role(docs, "kubealign", "kubealign-system")
    assert only(docs, "ServiceAccount")["metadata"]["name"] == "kubealign"
    args = operator_container(docs)["args"]
    assert "--all-namespaces" in args
    assert not any(arg.startswith("--namespace") for arg in args)


def test_namespaced_mode_grants_nothing_cluster_wide(helm: str) -> None:
    docs = render(helm, "watchNamespaces={team-a,team-b}", "serviceAccount.name=trainer-operator")
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    assert_leader_election_role(docs, "trainer-operator", "kubealign-system")
    roles = {role["metadata"]["namespace"]: role for role in by_kind(docs, "Role")}
    roles.pop("kubealign-system")
    assert sorted(roles) == ["team-a", "team-b"]
    assert all(role["rules"] == operator_rules() for role in roles.values())
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] != "kubealign-system"]
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "trainer-operator", "namespace": "kubealign-system"}
        ]
    args = operator_container(docs)["args"]
    assert [arg for arg in args if arg.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--all-namespaces" not in args


def test_existing_service_account_must_be_named(helm: str) -> None:
    command = [helm, "template", "kubealign", str(CHART), KUBE_VERSION, "--set=serviceAccount.create=false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "serviceAccount.name is required" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Against the local control plane


@pytest.mark.cluster
@pytest.mark.parametrize("watch", ["namespaced", "cluster-wide"])
def test_rendered_chart_passes_server_side_dry_run(
    helm: str, cluster: Any, namespace: str, watch: str
) -> None:
    sets = [f"--set=watchNamespaces={{{namespace}}}"] if watch == "namespaced" else []
    manifest = run_helm(
        helm,
        "template",
        f"dry-{watch}",
        str(CHART),
        f"--namespace={namespace}",
        KUBE_VERSION,
        "--include-crds",
        *sets,
    )
    result = cluster.kubectl("apply", "--dry-run=server", "--output=name", "-f", "-", input=manifest)
    applied = set(result.stdout.split())
    expected = {
        "customresourcedefinition.apiextensions.k8s.io/alignmentruns.kubealign.io",
        f"serviceaccount/dry-{watch}-kubealign",
        f"deployment.apps/dry-{watch}-kubealign",
        f"service/dry-{watch}-kubealign-metrics",
    }
    assert expected <= applied, result.stdout
    role = "role" if watch == "namespaced" else "clusterrole"
    assert f"{role}.rbac.authorization.k8s.io/dry-{watch}-kubealign" in applied


def _can(cluster: Any, user: str, verb: str, resource: str, namespace: str, *extra: str) -> bool:
    result = cluster.kubectl(
        "auth", "can-i", verb, resource, f"--namespace={namespace}", f"--as={user}", *extra, check=False
    )
    return bool(result.stdout.strip() == "yes")


@pytest.mark.cluster
def test_helm_install_grants_the_operator_exactly_its_rules(helm: str, cluster: Any, namespace: str) -> None:
    output = run_helm(
        helm,
        "install",
        "kubealign",
        str(CHART),
        f"--namespace={namespace}",
        f"--set=watchNamespaces={{{namespace}}}",
        # The session's cluster already has the admission policy (kubealign crd | kubectl apply);
        # a second owner of a cluster-scoped object is refused, so this release leaves it out.
        "--set=admissionPolicy.enabled=false",
        "--wait",
        "--timeout=120s",
        cluster=cluster,
    )
    try:
        assert "kubectl -n" in output and "get alr -w" in output, "NOTES.txt should say what to do next"
        status = json.loads(
            run_helm(
                helm, "status", "kubealign", f"--namespace={namespace}", "--output=json", cluster=cluster
            )
        )
        assert status["info"]["status"] == "deployed"
        user = f"system:serviceaccount:{namespace}:kubealign"
        allowed = [
            ("watch", "alignmentruns.kubealign.io"),
            ("create", "leases.coordination.k8s.io"),
            ("update", "leases.coordination.k8s.io"),
            ("create", "jobs.batch"),
            ("patch", "jobs.batch"),
            ("create", "configmaps"),
            ("create", "services"),
            ("list", "pods"),
            ("create", "events"),
        ]
        for verb, resource in allowed:
            assert _can(cluster, user, verb, resource, namespace), f"{verb} {resource} should be allowed"
        assert _can(cluster, user, "patch", "alignmentruns.kubealign.io", namespace, "--subresource=status")
        assert not _can(cluster, user, "get", "alignmentruns.kubealign.io", namespace, "--subresource=status")
        denied = [
            ("get", "secrets"),
            ("delete", "jobs.batch"),
            ("delete", "alignmentruns.kubealign.io"),
            # kopf keeps no bookkeeping on runs: the operator never writes a run but its status.
            ("patch", "alignmentruns.kubealign.io"),
            ("delete", "leases.coordination.k8s.io"),
            ("create", "pods"),
            ("create", "roles.rbac.authorization.k8s.io"),
            # Grants the operator never used in an audited run (the e2e test runs it under these rules).
            ("get", "pods"),
        ]
        for verb, resource in denied:
            assert not _can(cluster, user, verb, resource, namespace), f"{verb} {resource} should be denied"
        # Namespaced mode: nothing outside the watched namespace.
        assert not _can(cluster, user, "list", "alignmentruns.kubealign.io", "default")
        assert not _can(cluster, user, "create", "jobs.batch", "kube-system")
        assert not _can(cluster, user, "update", "leases.coordination.k8s.io", "kube-system")
    finally:
        run_helm(helm, "uninstall", "kubealign", f"--namespace={namespace}", "--wait", cluster=cluster)


def test_monitoring_is_off_by_default_and_each_part_renders_on_its_own(helm: str) -> None:
    kinds = {doc["kind"] for doc in render(helm)}
    assert not kinds & {"PrometheusRule", "ServiceMonitor"}
    assert not [d for d in by_kind(render(helm), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]

    docs = render(
        helm,
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.grafanaDashboard.namespace=grafana",
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.queuedTooLongSeconds=600",
        "monitoring.prometheusRule.labels.release=prom",
        "monitoring.serviceMonitor.enabled=true",
    )
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["kubealign-operator.json"])
    assert board["uid"] == "kubealign-operator"
    # Every panel queries the dashboard's datasource variable, so it works with any Prometheus.
    assert {p["datasource"]["uid"] for p in board["panels"]} == {"${datasource}"}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    rule = only(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert sorted(rules) == ["KubealignReconcileErrors", "KubealignRunFailed", "KubealignStageQueuedTooLong"]
    assert rules["KubealignStageQueuedTooLong"]["expr"].endswith("> 600")
    # Alert templates reach Prometheus unrendered by helm.
    assert "{{ $labels.name }}" in rules["KubealignRunFailed"]["annotations"]["summary"]
    monitor = only(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
