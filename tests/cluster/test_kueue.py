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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import localcluster
from kubealign import render
from kubealign.k8s import Kube
from tests.cluster.operator_harness import Reader, install_crd, operator_thread, submit
from tests.conftest import Cluster, _cluster_tool, namespace_name
from tests.e2e.agent_fixture import RunningAgent, node_agent
from tests.e2e.test_e2e import TINY_MODEL
from tests.operator.run_builders import manifest, stage, uri
from tests.processes import wait_until

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
    second = reader.status("second")
    assert (second["phase"], second["runningStages"]) == ("Running", "train(queued)")  # the run goes on
    progressing = next(c for c in second["conditions"] if c["type"] == "Progressing")
    assert progressing["message"] == f"train queued: {waiting['message']}"
    # `kubectl get -o wide` shows the mark and Kueue's reason.
    wide = kueue_cluster.kubectl("get", "alignmentruns", "second", "-n", queue_namespace, "-o", "wide").stdout
    assert "train(queued)" in wide and "insufficient unused quota for nvidia.com/gpu" in wide

    reader.wait_phase("first", "Succeeded", timeout=90)
    freed = time.monotonic()
    wait_until("second to be admitted", lambda: reader.stage("second", "train").get("phase") == "Running",
               timeout=60, interval=0.1)  # fmt: skip
    admitted = time.monotonic() - freed
    status = reader.wait_phase("second", "Succeeded", timeout=90)
    print(f"queued -> admitted {admitted:.2f}s after the first run's status said Succeeded")
    assert [entry["attempts"] for entry in status["stages"]] == [1]
    assert status["stages"][0].get("message", "") == ""
    # It waited for the first run's 8 s (timestamps have 1 s resolution); no longer waiting.
    assert status["stages"][0]["queuedSeconds"] >= 3 and "queuedSince" not in status["stages"][0]


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


def priority_class(name: str, value: int) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": name},
        "value": value,
        "preemptionPolicy": "PreemptLowerPriority",
    }


def agent_logs(agent: RunningAgent, run: str) -> list[list[dict[str, Any]]]:
    """The JSON records each of the run's pods on the agent printed, pod by pod in start order."""
    logs = sorted(agent.work_dir.glob(f"*_{run}-*/container.log"), key=lambda path: path.stat().st_mtime)
    return [
        [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] for path in logs
    ]


@pytest.mark.s3
@pytest.mark.slow
def test_a_preempted_stage_checkpoints_on_sigterm_and_resumes_there_with_attempts_unchanged(
    kueue_cluster: Cluster,
    queue_namespace: str,
    kueue_reader: Reader,
    operator: OperatorThread,
    *,
    s3_server: Any,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A high-priority run takes the only GPU of a small ClusterQueue from a low-priority one that
    is training for real on the node agent: Kueue evicts the low run's Workload and suspends its
    Job, the pod's trainer gets SIGTERM, publishes a checkpoint of the step it is on and exits; when
    the GPU is free again Kueue admits it again and the new pod resumes from exactly that step. The
    stage keeps attempt 1: a preemption is not a failure."""
    reader = kueue_reader
    namespace = queue_namespace
    low, high = f"{namespace[:40]}-low", f"{namespace[:40]}-high"
    objects = [
        priority_class(low, 100),
        priority_class(high, 1000),
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": namespace[:63]},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": localcluster.KUEUE_FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "16"},
                                    {"name": "memory", "nominalQuota": "64Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "1"},
                                ],
                            }
                        ],
                    }
                ],
                "preemption": {"withinClusterQueue": "LowerPriority"},
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "one-gpu", "namespace": namespace},
            "spec": {"clusterQueue": namespace[:63]},
        },
    ]
    kueue_cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(item) for item in objects))
    kueue_cluster.kubectl(
        "create", "secret", "generic", "s3", "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key_id}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_access_key}",
    )  # fmt: skip
    corpus = "".join(f"the quick brown fox {index} jumps over the lazy dog.\n" for index in range(400))
    s3.put_object(Bucket=bucket, Key="data/corpus.txt", Body=corpus.encode())
    storage = {
        "uri": f"s3://{bucket}/runs",
        "endpoint": s3_server.endpoint,
        "region": s3_server.region,
        "secretRef": {"name": "s3"},
    }
    resources = {"gpusPerNode": 1, "cpu": "1", "memory": "2Gi"}

    with node_agent(kueue_cluster.kubeconfig, tmp_path, "--gpus=1") as agent:
        training = manifest(
            [
                stage(
                    "pretrain", "pretrain", inputs={"data": uri(f"s3://{bucket}/data/corpus.txt")},
                    hyperparameters={
                        "model": TINY_MODEL, "vocab_size": 320, "block_size": 32, "max_steps": 600,
                        "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0, "log_every": 1,
                        # No interval checkpoint before the preemption: only the signal's saves work.
                        "checkpoint_every": 500,
                    },
                    resources=resources, nodeSelector=agent.node_selector, tolerations=agent.tolerations,
                    terminationGracePeriodSeconds=60, maxRetries=0,
                )
            ],
            name="low", namespace=namespace, queueName="one-gpu", priorityClassName=low, storage=storage,
        )  # fmt: skip
        submit(kueue_cluster, namespace, training)

        def trained_steps() -> int:
            logs = agent_logs(agent, "low")
            return (
                max((r["step"] for r in logs[0] if "event" not in r and "step" in r), default=0)
                if logs
                else 0
            )

        wait_until("the low-priority run to train a few steps", lambda: trained_steps() >= 20, timeout=240)

        urgent = manifest(
            [
                stage(
                    "sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
                    resources=resources, podAnnotations={KWOK_RUN_SECONDS: "3"},
                )
            ],
            name="high", namespace=namespace, queueName="one-gpu", priorityClassName=high,
        )  # fmt: skip
        submit(kueue_cluster, namespace, urgent)
        evicted = wait_until(
            "the low run to be evicted",
            lambda: (
                (s := reader.stage("low", "pretrain")).get("phase") == "Queued"
                and "evicted by Kueue (Preempted)" in s.get("message", "")
                and s
            ),
            timeout=60,
            interval=0.2,
        )
        reader.wait_phase("high", "Succeeded", timeout=120)
        status = reader.wait_phase("low", "Succeeded", timeout=300)

    (first, second) = agent_logs(agent, "low")
    (stopped,) = [record for record in first if record.get("event") == "stopped"]
    (resumed,) = [record for record in second if record.get("event") == "resumed"]
    trained = max(record["step"] for record in first if "event" not in record and "step" in record)
    print(
        f"preempted at step {stopped['step']} (last step trained {trained}); resumed at step "
        f"{resumed['step']}: {trained - resumed['step']} steps lost (an interval checkpoint alone "
        f"would have lost {trained}); queued message: {evicted['message']!r}"
    )
    assert resumed["step"] == stopped["step"] == trained
    (entry,) = status["stages"]
    assert entry["attempts"] == 1 and entry["jobName"] == "low-pretrain-1"
    assert sorted(reader.jobs("low")) == ["low-pretrain-1"]
