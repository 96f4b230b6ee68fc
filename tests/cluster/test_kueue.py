"""Real Kueue (built from sigs.k8s.io/kueue, started by `tools/cluster up --kueue`) admitting the
operator's Jobs: quota, the reason a stage waits, and all-or-nothing admission of multi-node stages.

The module starts its own control plane with Kueue (2 fake nodes x 8 GPUs: a ClusterQueue quota of
16 nvidia.com/gpu), so the session's shared cluster never runs Kueue's webhooks.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

import localcluster
from kubealign import render
from kubealign.k8s import Kube
from tests.cluster.operator_harness import Reader, install_crd, operator_thread, submit, wait_until
from tests.conftest import Cluster, _cluster_tool, namespace_name
from tests.operator.run_builders import manifest, stage, uri

if TYPE_CHECKING:
    from tests.cluster.operator_harness import OperatorThread

pytestmark = pytest.mark.cluster

NODES, GPUS_PER_NODE = 2, 8
LOCAL_QUEUE = "gpus"
KWOK_RUN_SECONDS = "kubealign.io/kwok-run-seconds"


@pytest.fixture(scope="module")
def kueue_cluster() -> Iterator[Cluster]:
    state_dir = localcluster.cache_dir() / "state" / f"pytest-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        up = _cluster_tool(
            "up", "--kueue", f"--nodes={NODES}", f"--gpus-per-node={GPUS_PER_NODE}", "--state-dir",
            str(state_dir), timeout=300,
        )  # fmt: skip
        if up.returncode != 0:
            pytest.fail(f"`tools/cluster up --kueue` failed:\n{up.stderr}", pytrace=False)
        cluster = Cluster(
            kubeconfig=up.stdout.strip().splitlines()[-1],
            context=localcluster.CONTEXT_NAME,
            kubectl_path=str(localcluster.BINARY_BY_NAME["kubectl"].path()),
            state_dir=str(state_dir),
        )
        install_crd(cluster)
        yield cluster
    finally:
        _cluster_tool("down", "--state-dir", str(state_dir), timeout=120)


@pytest.fixture
def queue_namespace(kueue_cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace with a LocalQueue pointing at the ClusterQueue `tools/cluster` made."""
    name = namespace_name(request.node.name)
    kueue_cluster.kubectl("create", "namespace", name)
    local_queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": LOCAL_QUEUE, "namespace": name},
        "spec": {"clusterQueue": localcluster.KUEUE_CLUSTER_QUEUE},
    }
    kueue_cluster.kubectl("apply", "-f", "-", input=json.dumps(local_queue))
    return name


@pytest.fixture
def kueue_reader(kueue_cluster: Cluster, queue_namespace: str) -> Reader:
    return Reader(
        Kube.connect(kubeconfig=kueue_cluster.kubeconfig, context=kueue_cluster.context), queue_namespace
    )


@pytest.fixture
def operator(kueue_cluster: Cluster, queue_namespace: str) -> Iterator[OperatorThread]:
    with operator_thread(kueue_cluster, queue_namespace, kueue=True) as running:
        yield running


def gpu_run(name: str, namespace: str, *, nodes: int, seconds: float) -> dict[str, Any]:
    return manifest(
        [
            stage(
                "train",
                "sft",
                inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
                resources={"nodes": nodes, "gpusPerNode": GPUS_PER_NODE},
                podAnnotations={KWOK_RUN_SECONDS: str(seconds)},
            )
        ],
        name=name,
        namespace=namespace,
        queueName=LOCAL_QUEUE,
    )


def pods_of(reader: Reader, name: str) -> list[dict[str, Any]]:
    return reader.kube.list("Pod", reader.namespace, selector=render.run_selector(name))


def test_a_run_waits_with_kueues_reason_until_the_quota_frees_then_runs(
    kueue_cluster: Cluster, queue_namespace: str, kueue_reader: Reader, operator: OperatorThread
) -> None:
    reader = kueue_reader
    submit(kueue_cluster, queue_namespace, gpu_run("first", queue_namespace, nodes=NODES, seconds=8))
    wait_until("first to run", lambda: reader.stage("first", "train").get("phase") == "Running", timeout=60)
    submit(kueue_cluster, queue_namespace, gpu_run("second", queue_namespace, nodes=NODES, seconds=1))

    waiting = wait_until(
        "second to wait with Kueue's reason",
        lambda: (
            (s := reader.stage("second", "train")).get("phase") == "Queued"
            and "insufficient unused quota for nvidia.com/gpu" in s.get("message", "")
            and s
        ),
        timeout=30,
    )
    assert waiting["message"].startswith("waiting for Kueue: ")
    assert pods_of(reader, "second") == []  # nothing starts while it waits
    assert reader.status("second")["phase"] == "Running"  # the run goes on; its stage waits

    reader.wait_phase("first", "Succeeded", timeout=90)
    freed = time.monotonic()
    wait_until("second to be admitted", lambda: reader.stage("second", "train").get("phase") == "Running",
               timeout=60, interval=0.1)  # fmt: skip
    admitted = time.monotonic() - freed
    status = reader.wait_phase("second", "Succeeded", timeout=90)
    print(f"queued -> admitted {admitted:.2f}s after the first run's status said Succeeded")
    assert [entry["attempts"] for entry in status["stages"]] == [1]
    assert status["stages"][0].get("message", "") == ""


def test_a_two_node_stage_is_admitted_whole_or_not_at_all(
    kueue_cluster: Cluster, queue_namespace: str, kueue_reader: Reader, operator: OperatorThread
) -> None:
    reader = kueue_reader
    # Half the GPUs taken: the 2-node stage's first pod would fit on the free node, the second not.
    submit(kueue_cluster, queue_namespace, gpu_run("blocker", queue_namespace, nodes=1, seconds=10))
    wait_until("the blocker to run", lambda: reader.stage("blocker", "train").get("phase") == "Running",
               timeout=60)  # fmt: skip
    submit(kueue_cluster, queue_namespace, gpu_run("gang", queue_namespace, nodes=NODES, seconds=1))
    wait_until("the gang stage to queue", lambda: reader.stage("gang", "train").get("phase") == "Queued",
               timeout=30)  # fmt: skip
    while reader.stage("blocker", "train").get("phase") == "Running":
        assert pods_of(reader, "gang") == [], "part of the 2-node stage started"
        time.sleep(0.5)

    status = reader.wait_phase("gang", "Succeeded", timeout=120)
    pods = pods_of(reader, "gang")
    assert len(pods) == NODES and all(pod["status"]["phase"] == "Succeeded" for pod in pods)
    assert [entry["attempts"] for entry in status["stages"]] == [1]
