"""Smoke tests of the local control plane: scheduling onto fake GPU nodes, Job outcomes driven by the
kwok annotations, pod deletion, garbage collection, and a CRD with a status subresource."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.processes import wait_until

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster


def as_dict(api: client.ApiClient, obj: object) -> dict[str, Any]:
    """The object as the API server's JSON (camelCase), which reads like kubectl -o json."""
    data: dict[str, Any] = api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return data


def gpu_job(
    name: str, *, gpus: int = 1, annotations: dict[str, str] | None = None, backoff_limit: int = 0
) -> client.V1Job:
    container = client.V1Container(
        name="trainer",
        image="kubealign/trainer:smoke",  # never pulled: kwok plays the kubelet
        resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
    )
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations),
                spec=client.V1PodSpec(restart_policy="Never", containers=[container]),
            ),
        ),
    )


def job_with_condition(api: client.ApiClient, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    job = as_dict(api, client.BatchV1Api(api).read_namespaced_job(name, namespace))
    conditions = job.get("status", {}).get("conditions", [])
    return job if any(c["type"] == kind and c["status"] == "True" for c in conditions) else None


def job_pods(api: client.ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={name}")
    return [as_dict(api, pod) for pod in pods.items]


def gone(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_gpu_job_runs_on_a_fake_gpu_node_and_completes(kube_api: client.ApiClient, namespace: str) -> None:
    metrics = {"loss": 0.25, "step": 10}
    annotations = {"kubealign.io/kwok-termination-message": json.dumps(metrics)}
    client.BatchV1Api(kube_api).create_namespaced_job(namespace, gpu_job("gpu", annotations=annotations))

    job = wait_until("Job gpu Complete", lambda: job_with_condition(kube_api, namespace, "gpu", "Complete"))

    assert job["status"]["succeeded"] == 1
    [pod] = job_pods(kube_api, namespace, "gpu")
    node = as_dict(kube_api, client.CoreV1Api(kube_api).read_node(pod["spec"]["nodeName"]))
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert json.loads(terminated["message"]) == metrics


def test_a_pod_asking_for_more_gpus_than_a_node_has_stays_unschedulable(
    kube_api: client.ApiClient, namespace: str
) -> None:
    client.BatchV1Api(kube_api).create_namespaced_job(namespace, gpu_job("greedy", gpus=9))

    def scheduling_verdict() -> dict[str, Any] | None:
        for pod in job_pods(kube_api, namespace, "greedy"):
            for condition in pod["status"].get("conditions", []):
                if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                    return pod
        return None

    pod = wait_until("the scheduler to report Unschedulable", scheduling_verdict, timeout=30)
    assert "nodeName" not in pod["spec"]
    message = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "nvidia.com/gpu" in message


def test_a_failing_pod_fails_its_job_after_the_backoff_limit(
    kube_api: client.ApiClient, namespace: str
) -> None:
    annotations = {
        "kubealign.io/kwok-fail": "true",
        "kubealign.io/kwok-exit-code": "3",
        "kubealign.io/kwok-run-seconds": "0.2",
    }
    job = gpu_job("broken", annotations=annotations, backoff_limit=1)
    client.BatchV1Api(kube_api).create_namespaced_job(namespace, job)

    # The Job controller waits 10 s before it replaces the first failed pod.
    failed = wait_until(
        "Job broken Failed", lambda: job_with_condition(kube_api, namespace, "broken", "Failed"), timeout=90
    )

    assert failed["status"]["failed"] == 2
    reasons = [c["reason"] for c in failed["status"]["conditions"] if c["type"] == "Failed"]
    assert reasons == ["BackoffLimitExceeded"]
    pods = job_pods(kube_api, namespace, "broken")
    assert [pod["status"]["phase"] for pod in pods] == ["Failed", "Failed"]
    for pod in pods:
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_deleting_a_running_job_removes_its_pods(kube_api: client.ApiClient, namespace: str) -> None:
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(
        namespace, gpu_job("long", annotations={"kubealign.io/kwok-run-seconds": "600"})
    )
    wait_until(
        "the pod Running",
        lambda: [pod for pod in job_pods(kube_api, namespace, "long") if pod["status"]["phase"] == "Running"],
    )

    batch.delete_namespaced_job("long", namespace, propagation_policy="Foreground")

    # Foreground: the Job goes only after its pods, which kwok must terminate and delete.
    wait_until("the Job and its pod gone", lambda: gone(lambda: batch.read_namespaced_job("long", namespace)))
    assert job_pods(kube_api, namespace, "long") == []


def test_deleting_an_owner_cascades_to_what_it_owns(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "1"})
    )
    owner_uid = as_dict(kube_api, owner)["metadata"]["uid"]
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner_uid)
    owned = client.V1ObjectMeta(name="owned", owner_references=[reference])
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=owned))
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander"))
    )

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    wait_until(
        "the garbage collector to delete the owned ConfigMap",
        lambda: gone(lambda: core.read_namespaced_config_map("owned", namespace)),
        timeout=30,
    )
    assert not gone(lambda: core.read_namespaced_config_map("bystander", namespace))


@pytest.fixture
def widget_crd(cluster: Cluster, kube_api: client.ApiClient) -> Iterator[str]:
    """A namespaced CRD with a status subresource in a group of its own, applied with kubectl."""
    group = f"smoke-{secrets.token_hex(3)}.kubealign.io"
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        },
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }
    cluster.kubectl("apply", "--filename=-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")
    yield group
    cluster.kubectl("delete", f"crd/widgets.{group}", "--wait=false")


def test_a_custom_resource_gets_its_status_through_the_subresource(
    kube_api: client.ApiClient, namespace: str, widget_crd: str
) -> None:
    group, custom = widget_crd, client.CustomObjectsApi(kube_api)
    body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}

    def created() -> object:
        # A new resource can take a moment to reach the API server's handlers after Established.
        try:
            return custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", body)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    generation = as_dict(kube_api, wait_until("the Widget created", created, timeout=30))["metadata"][
        "generation"
    ]

    custom.patch_namespaced_custom_object_status(
        group, "v1", namespace, "widgets", "w", {"status": {"phase": "Ready"}}
    )
    # With a status subresource, status sent to the main resource is ignored.
    custom.patch_namespaced_custom_object(
        group, "v1", namespace, "widgets", "w", {"status": {"phase": "Bogus"}}
    )

    widget = as_dict(kube_api, custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w"))
    assert widget["status"] == {"phase": "Ready"}
    assert widget["spec"] == {"size": 3}
    assert widget["metadata"]["generation"] == generation
