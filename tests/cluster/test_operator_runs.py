"""The operator on the real control plane: runs go from kubectl create to Succeeded or Failed.

kwok plays the kubelet: Job pods run for ``kubealign.io/kwok-run-seconds`` (default 1s) and end
Succeeded, or Failed with ``kubealign.io/kwok-fail``; ``kubealign.io/kwok-termination-message``
becomes the trainer container's termination message, i.e. the metrics the trainer would report.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from kubealign import render
from kubealign.defaults import InstallDefaults
from kubealign.reconcile import Reconciler
from tests.cluster.operator_harness import (
    REPO_ROOT,
    OperatorProcess,
    Reader,
    operator_thread,
    submit,
)
from tests.operator.run_builders import manifest, pipeline, src, stage, uri
from tests.processes import wait_until

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster

KWOK_RUN_SECONDS = "kubealign.io/kwok-run-seconds"
KWOK_FAIL = "kubealign.io/kwok-fail"
KWOK_EXIT_CODE = "kubealign.io/kwok-exit-code"
KWOK_MESSAGE = "kubealign.io/kwok-termination-message"


@pytest.fixture
def operator(cluster: Cluster, namespace: str, crd: None) -> Iterator[Any]:
    with operator_thread(cluster, namespace) as running:
        yield running


def with_metrics(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stage's pod reports its own metrics, e.g. {"stage": "sft", "loss": 0.5}."""
    for index, entry in enumerate(stages):
        report = json.dumps({"stage": entry["name"], "loss": round(1.0 / (index + 1), 3)})
        entry["podAnnotations"] = {**entry.get("podAnnotations", {}), KWOK_MESSAGE: report}
    return stages


def test_all_stage_types_reach_succeeded(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    submit(cluster, namespace, manifest(with_metrics(pipeline()), name="full"))
    status = reader.wait_phase("full", "Succeeded")

    assert (status["progress"], status["runningStages"], status["observedGeneration"]) == ("7/7", "", 1)
    assert status["startTime"] <= status["completionTime"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Ready"] == ("True", "Succeeded")
    assert conditions["Failed"] == ("False", "NoFailure")
    for index, entry in enumerate(status["stages"]):
        name = entry["name"]
        assert entry["phase"] == "Succeeded", entry
        assert (entry["attempts"], entry["jobName"]) == (1, f"full-{name}-1")
        assert entry["startTime"] <= entry["completionTime"]
        assert entry["metrics"] == {"stage": name, "loss": round(1.0 / (index + 1), 3)}
        assert entry["output"] == f"s3://kubealign-test/runs/{namespace}/full/{name}/artifact"
    # Dependencies were respected: nothing started before its inputs finished.
    stages = {s["name"]: s for s in status["stages"]}
    for consumer, producer in [
        ("sft", "pretrain"),
        ("reward", "generate"),
        ("ppo", "reward"),
        ("evaluate", "dpo"),
    ]:
        assert stages[consumer]["startTime"] >= stages[producer]["completionTime"]

    jobs = reader.jobs("full")
    assert sorted(jobs) == sorted(f"full-{s['name']}-1" for s in pipeline())
    # One Normal Event per reconcile: a hand-over (one stage succeeded, the next started) is one.
    events = reader.events("full")
    messages = reader.messages("full")
    assert sum(" started: job " in m for m in messages) == 7
    assert sum(" succeeded after 1 attempt(s)" in m for m in messages) == 7
    assert sum(m.startswith("all stages succeeded") for m in messages) == 1
    assert len(events) < 14, "hand-overs are one Event each"
    assert events[-1]["reason"] == "StageSucceeded" and "all stages succeeded" in events[-1]["message"]
    table = cluster.kubectl("get", "alr", "full", "-n", namespace, "--no-headers").stdout.split()
    assert table[1:3] == ["Succeeded", "7/7"]


def test_stage_job_is_rendered_as_specified(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    body = manifest(
        [
            stage(
                "sft",
                "sft",
                inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
                resources={"gpusPerNode": 2, "memory": "8Gi"},
            )
        ],
        name="render",
        storage={
            "uri": "s3://bucket/runs",
            "endpoint": "http://s3.local:9000",
            "secretRef": {"name": "s3-creds"},
        },
    )
    submit(cluster, namespace, body)
    reader.wait_phase("render", "Succeeded")
    job = reader.jobs("render")["render-sft-1"]
    run_uid = reader.run("render")["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == run_uid
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "sft"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "8Gi"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    config_map = reader.kube.get("ConfigMap", namespace, "render-sft-1")
    config = json.loads(config_map["data"]["stage.json"])
    assert config["output"] == f"s3://bucket/runs/{namespace}/render/sft"
    assert config["resume"] == f"s3://bucket/runs/{namespace}/render/sft/checkpoints"
    assert config["distributed"] == {"nnodes": 1, "nproc_per_node": 2}


def test_dpo_and_ppo_branches_run_in_parallel(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    slow = {KWOK_RUN_SECONDS: "4"}
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://d00/prefs")}, podAnnotations=slow),
        stage(
            "ppo",
            "ppo",
            inputs={"model": src("sft"), "rewardModel": uri("s3://m00/rm"), "data": uri("s3://d00/prompts")},
            podAnnotations=slow,
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="branches"))

    def both_active() -> dict[str, Any] | None:
        jobs = reader.jobs("branches")
        dpo, ppo = jobs.get("branches-dpo-1"), jobs.get("branches-ppo-1")
        if dpo and ppo and dpo["status"].get("active") and ppo["status"].get("active"):
            return reader.status("branches")
        return None

    status = wait_until("dpo and ppo Jobs active at the same time", both_active, timeout=60)
    assert status["runningStages"] in ("dpo,ppo", "ppo,dpo")
    final = reader.wait_phase("branches", "Succeeded")
    started = {s["name"]: datetime.fromisoformat(s["startTime"]) for s in final["stages"]}
    assert abs((started["dpo"] - started["ppo"]).total_seconds()) <= 1


def test_a_sweep_runs_one_job_per_member_within_max_parallel(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    """Through the real admission policy and operator: members, fan-out, maxParallel, status."""
    slow = {KWOK_RUN_SECONDS: "2"}
    stages = [
        stage(
            "dpo",
            "dpo",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/prefs")},
            sweep={"beta": [0.1, 0.3], "seed": [0, 1]},
            maxParallel=2,
            podAnnotations=slow,
        ),
        stage(
            "evaluate",
            "evaluate",
            inputs={"model": uri("s3://m00/base"), "policies": [src("dpo")], "data": uri("s3://d00/eval")},
            hyperparameters={"scorer": "vader"},
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="swept"))
    most = 0

    def finished() -> dict[str, Any] | None:
        nonlocal most
        active = [j for j in reader.jobs("swept").values() if j["status"].get("active")]
        most = max(most, len([j for j in active if "-dpo-" in j["metadata"]["name"]]))
        status = reader.status("swept")
        return status if status.get("phase") == "Succeeded" else None

    status = wait_until("the swept run succeeds", finished, timeout=120)
    assert status["progress"] == "5/5"
    members = [s["name"] for s in status["stages"]]
    assert members == [
        "dpo-beta-0p1-seed-0",
        "dpo-beta-0p1-seed-1",
        "dpo-beta-0p3-seed-0",
        "dpo-beta-0p3-seed-1",
        "evaluate",
    ]
    assert status["stages"][2]["sweep"] == {"stage": "dpo", "values": {"beta": 0.3, "seed": 0}}
    assert 1 <= most <= 2, f"{most} dpo members ran at once; maxParallel is 2"
    config = json.loads(
        reader.kube.get("ConfigMap", namespace, "swept-dpo-beta-0p3-seed-0-1")["data"]["stage.json"]
    )
    assert (config["seed"], config["hyperparameters"]["beta"]) == (0, 0.3)
    evaluate = json.loads(reader.kube.get("ConfigMap", namespace, "swept-evaluate-1")["data"]["stage.json"])
    assert sorted(evaluate["inputs"]["policies"]) == members[:4]
    # A bad sweep value is refused at kubectl apply, naming the field.
    bad = manifest([{**stages[0], "sweep": {"beta": [0.1, -1.0]}}], name="bad-sweep", namespace=namespace)
    refused = cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "spec.stages[0].sweep.beta" in refused.stderr, refused.stderr


def test_a_node_drain_restarts_the_pod_without_spending_a_retry(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    # `kubectl drain` evicts through the Eviction API: the pod gets the DisruptionTarget condition,
    # which the Job's podFailurePolicy ignores, so the job controller starts a new pod (resuming from
    # the stage's checkpoint) in the same Job and the stage stays on attempt 1.
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
              maxRetries=0, podAnnotations={KWOK_RUN_SECONDS: "6"}),
    ]  # fmt: skip
    submit(cluster, namespace, manifest(stages, name="drained"))
    selector = render.run_selector("drained")

    def running_pods() -> list[dict[str, Any]]:
        pods = reader.kube.list("Pod", namespace, selector=selector)
        return [pod for pod in pods if pod["status"].get("phase") == "Running"]

    running = wait_until("the trainer pod to run", running_pods, timeout=60)
    node = running[0]["spec"]["nodeName"]
    try:
        cluster.kubectl(
            "drain", node, f"--pod-selector={selector}", "--delete-emptydir-data", "--ignore-daemonsets",
            "--timeout=60s",
        )  # fmt: skip
        status = reader.wait_phase("drained", "Succeeded", timeout=90)
    finally:
        cluster.kubectl("uncordon", node)
    (sft,) = status["stages"]
    assert (sft["attempts"], sft["jobName"]) == (1, "drained-sft-1")
    assert sorted(reader.jobs("drained")) == ["drained-sft-1"]
    # The evicted pod is gone (the node's kubelet ended it); a new one ran elsewhere and succeeded.
    (finished,) = reader.kube.list("Pod", namespace, selector=selector)
    assert finished["metadata"]["name"] != running[0]["metadata"]["name"]
    assert finished["status"]["phase"] == "Succeeded" and finished["spec"]["nodeName"] != node


def test_a_configuration_error_fails_the_stage_at_once_without_retries(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    # The trainer's exit code 2 (EXIT_BAD_INPUT) is a FailJob rule of the Job's podFailurePolicy: the
    # real job controller fails the Job, and the operator spends none of maxRetries on it.
    bad = {KWOK_FAIL: "true", KWOK_EXIT_CODE: "2", KWOK_MESSAGE: "sft.data line 3: messages: expected a list"}
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
              maxRetries=3, podAnnotations=bad),
    ]  # fmt: skip
    submit(cluster, namespace, manifest(stages, name="bad-input"))
    status = reader.wait_phase("bad-input", "Failed")
    (sft,) = status["stages"]
    assert (sft["phase"], sft["attempts"]) == ("Failed", 1)
    assert sft["message"] == "exit code 2 (Error): sft.data line 3: messages: expected a list"
    assert sorted(reader.jobs("bad-input")) == ["bad-input-sft-1"]
    job = reader.jobs("bad-input")["bad-input-sft-1"]
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "StageRetrying" not in reader.reasons("bad-input")


def test_failing_stage_is_retried_then_fails_the_run(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    crash = {KWOK_FAIL: "true", KWOK_EXIT_CODE: "3", KWOK_MESSAGE: "RuntimeError: CUDA out of memory"}
    stages = [
        stage(
            "pre",
            "pretrain",
            inputs={"data": uri("s3://d00/corpus")},
            podAnnotations={KWOK_MESSAGE: '{"loss": 2}'},
        ),
        stage(
            "sft",
            "sft",
            inputs={"model": src("pre"), "data": uri("s3://d00/sft")},
            maxRetries=2,
            podAnnotations=crash,
        ),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://d00/prefs")}),
    ]
    submit(cluster, namespace, manifest(stages, name="crash"))
    status = reader.wait_phase("crash", "Failed")

    sft = {s["name"]: s for s in status["stages"]}["sft"]
    assert (sft["phase"], sft["attempts"], sft["jobName"]) == ("Failed", 3, "crash-sft-3")
    assert sft["message"] == "exit code 3 (Error): RuntimeError: CUDA out of memory"
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "StageFailed")
    assert (
        failed["message"]
        == "stage sft failed after 3 attempt(s): exit code 3 (Error): RuntimeError: CUDA out of memory"
    )
    # Exactly maxRetries + 1 attempts, nothing downstream, and the finished stage's Job is kept.
    assert sorted(reader.jobs("crash")) == ["crash-pre-1", "crash-sft-1", "crash-sft-2", "crash-sft-3"]
    assert {s["name"]: s for s in status["stages"]}["pre"]["metrics"] == {"loss": 2}
    reasons = reader.reasons("crash")
    assert reasons.count("StageRetrying") == 2
    assert reasons.count("StageFailed") == 1 and reasons.count("RunFailed") == 1
    # Every attempt resumes from the same checkpoint prefix.
    configs = [
        json.loads(reader.kube.get("ConfigMap", namespace, f"crash-sft-{n}")["data"]["stage.json"])
        for n in (1, 2, 3)
    ]
    assert len({c["resume"] for c in configs}) == 1


def test_operator_killed_mid_run_creates_no_duplicates(
    cluster: Cluster, namespace: str, crd: None, reader: Reader, tmp_path: Path
) -> None:
    stages = [
        stage(
            f"s{n}",
            "sft",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}
            if n == 0
            else {"model": src(f"s{n - 1}"), "data": uri("s3://d00/sft")},
            podAnnotations={KWOK_RUN_SECONDS: "2", KWOK_MESSAGE: json.dumps({"step": n})},
        )
        for n in range(4)
    ]
    submit(cluster, namespace, manifest(stages, name="restart"))
    first = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    try:
        wait_until(
            "stage s1 to run", lambda: reader.stage("restart", "s1").get("phase") == "Running", timeout=60
        )
    finally:
        first.kill()
    # While no operator runs, s1 finishes; nothing may start s2 yet.
    wait_until(
        "s1's Job to complete",
        lambda: reader.jobs("restart")["restart-s1-1"]["status"].get("succeeded"),
        timeout=30,
    )
    assert "restart-s2-1" not in reader.jobs("restart")
    # Even a lost status is rebuilt from the Jobs and their pods.
    wipe = '[{"op": "remove", "path": "/status"}]'
    cluster.kubectl(
        "patch", "alr", "restart", "-n", namespace, "--subresource=status", "--type=json", "-p", wipe
    )

    with operator_thread(cluster, namespace):
        status = reader.wait_phase("restart", "Succeeded")
    assert sorted(reader.jobs("restart")) == [f"restart-s{n}-1" for n in range(4)]
    for n, entry in enumerate(status["stages"]):
        assert (entry["phase"], entry["attempts"], entry["metrics"]) == ("Succeeded", 1, {"step": n})


def test_suspend_and_resume(cluster: Cluster, namespace: str, operator: Any, reader: Reader) -> None:
    stages = [
        stage(
            "sft",
            "sft",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
            podAnnotations={KWOK_RUN_SECONDS: "8"},
        ),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://d00/prefs")}),
    ]
    submit(cluster, namespace, manifest(stages, name="pause"))
    wait_until("sft to run", lambda: reader.stage("pause", "sft").get("phase") == "Running", timeout=60)

    cluster.kubectl(
        "patch", "alr", "pause", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    status = reader.wait_phase("pause", "Suspended", timeout=30)
    assert status["stages"][0]["phase"] == "Suspended"
    assert reader.jobs("pause")["pause-sft-1"]["spec"]["suspend"] is True
    wait_until(
        "the suspended Job's pod to stop",
        lambda: not reader.jobs("pause")["pause-sft-1"]["status"].get("active"),
        timeout=30,
    )
    suspended = {c["type"]: c["status"] for c in reader.status("pause")["conditions"]}
    assert suspended["Suspended"] == "True"

    cluster.kubectl(
        "patch", "alr", "pause", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    wait_until(
        "the Job to resume",
        lambda: reader.jobs("pause")["pause-sft-1"]["spec"]["suspend"] is False,
        timeout=30,
    )
    reader.wait_phase("pause", "Succeeded", timeout=90)
    assert sorted(reader.jobs("pause")) == ["pause-dpo-1", "pause-sft-1"]
    messages = reader.messages("pause")
    assert any(m.startswith("spec.suspend is true") for m in messages)  # RunSuspended
    assert any(" suspended" in m and "job pause-" in m for m in messages)  # StageSuspended
    assert any(" resumed: job pause-" in m for m in messages)  # StageResumed (with RunResumed)


def test_deleting_the_run_garbage_collects_its_children(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    stages = [
        stage(
            "sft",
            "sft",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
            resources={"nodes": 2},
            podAnnotations={KWOK_RUN_SECONDS: "60"},
        )
    ]
    submit(cluster, namespace, manifest(stages, name="doomed"))
    wait_until("the Job to exist", lambda: reader.jobs("doomed"), timeout=30)
    selector = render.run_selector("doomed")
    assert reader.kube.list("ConfigMap", namespace, selector=selector)
    assert reader.kube.list("Service", namespace, selector=selector)

    cluster.kubectl("delete", "alr", "doomed", "-n", namespace, "--wait=true")

    def children_left() -> list[str]:
        kinds = ("Job", "ConfigMap", "Service", "Pod")
        return [kind for kind in kinds if reader.kube.list(kind, namespace, selector=selector)]

    wait_until("the run's children to be garbage-collected", lambda: not children_left(), timeout=60)


def test_multi_node_stage_is_an_indexed_job_with_headless_service(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    stages = [
        stage(
            "pre",
            "pretrain",
            inputs={"data": uri("s3://d00/corpus")},
            resources={"nodes": 3, "gpusPerNode": 8},
            podAnnotations={KWOK_RUN_SECONDS: "3"},
        )
    ]
    submit(cluster, namespace, manifest(stages, name="multi"))

    def three_pods() -> list[dict[str, Any]]:
        pods = reader.kube.list("Pod", namespace, selector=render.run_selector("multi"))
        return pods if len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods) else []

    pods = wait_until("3 indexed pods scheduled", three_pods, timeout=60)
    job = reader.jobs("multi")["multi-pre-1"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == (
        "Indexed",
        3,
        3,
    )
    service = reader.kube.get("Service", namespace, "multi-pre-1")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "multi-pre-1"}
    indexes = sorted(
        int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in pods
    )
    assert indexes == [0, 1, 2]
    for p in pods:
        assert p["spec"]["subdomain"] == "multi-pre-1"
        assert (
            p["spec"]["hostname"]
            == f"multi-pre-1-{p['metadata']['annotations']['batch.kubernetes.io/job-completion-index']}"
        )
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        assert env["MASTER_ADDR"]["value"] == "multi-pre-1-0.multi-pre-1"
        assert (env["MASTER_PORT"]["value"], env["NNODES"]["value"], env["NPROC_PER_NODE"]["value"]) == (
            "29500",
            "3",
            "8",
        )
        assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert p["spec"]["containers"][0]["command"][0] == "torchrun"
    # The GPUs were scheduled: 3 pods x 8 GPUs on 3 different fake nodes of 8 GPUs each.
    assert len({p["spec"]["nodeName"] for p in pods}) == 3
    reader.wait_phase("multi", "Succeeded")


def test_invalid_spec_beyond_the_schema_is_a_condition_not_a_crash(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}),
        stage(
            "ppo", "ppo", inputs={"model": src("sft"), "rewardModel": src("sft"), "data": uri("s3://d00/p")}
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="semantic"))
    status = reader.wait_phase("semantic", "Failed", timeout=30)
    valid = {c["type"]: c for c in status["conditions"]}["Valid"]
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert "spec.stages[1].inputs.rewardModel.from" in valid["message"]
    assert reader.jobs("semantic") == {}
    assert "InvalidSpec" in reader.reasons("semantic")

    # Fixing the spec lets the run proceed; observedGeneration follows.
    fix = [{"op": "replace", "path": "/spec/stages/1/inputs/rewardModel", "value": {"uri": "s3://m00/rm"}}]
    cluster.kubectl("patch", "alr", "semantic", "-n", namespace, "--type=json", "-p", json.dumps(fix))
    status = reader.wait_phase("semantic", "Succeeded", timeout=60)
    assert status["observedGeneration"] == 2
    assert {c["type"]: c["status"] for c in status["conditions"]}["Valid"] == "True"


def test_a_hyperparameter_rule_past_the_api_server_is_a_valid_false_condition(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    """The admission policy checks each field; the operator also checks the rules that relate fields."""
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}),
        stage(
            "ppo",
            "ppo",
            inputs={"model": src("sft"), "data": uri("s3://d00/p")},
            hyperparameters={"scorer": "vader", "rollout_batch_size": 6, "mini_batch_size": 4},
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="crossfield"))
    status = reader.wait_phase("crossfield", "Failed", timeout=30)
    valid = {c["type"]: c for c in status["conditions"]}["Valid"]
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert "spec.stages[1].hyperparameters.mini_batch_size" in valid["message"]
    assert "does not divide" in valid["message"]
    assert reader.jobs("crossfield") == {}


def test_a_run_without_any_image_waits_for_the_install_default(
    cluster: Cluster, namespace: str, crd: None, reader: Reader
) -> None:
    """The API server accepts a run with no image; the operator reports it until the install provides one."""
    body = manifest(
        [stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")})],
        name="imageless",
    )
    del body["spec"]["image"]
    submit(cluster, namespace, body)

    reconciler = Reconciler(reader.kube, defaults=InstallDefaults())
    reconciler.refresh(namespace, "imageless")
    outcome = reconciler.reconcile(namespace, "imageless")
    assert outcome is not None and outcome.actions == ()
    status = reader.status("imageless")
    valid = {c["type"]: c for c in status["conditions"]}["Valid"]
    assert (status["phase"], valid["status"], valid["reason"]) == ("Failed", "False", "InvalidSpec")
    assert "spec.image" in valid["message"] and "defaultTrainerImage" in valid["message"]
    assert reader.jobs("imageless") == {}

    install = InstallDefaults(image="registry.example/trainer:install")
    reconciler = Reconciler(reader.kube, defaults=install)
    reconciler.refresh(namespace, "imageless")
    reconciler.reconcile(namespace, "imageless")
    (job,) = reader.jobs("imageless").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:install"
    assert {c["type"]: c["status"] for c in reader.status("imageless")["conditions"]}["Valid"] == "True"
    assert "image" not in reader.run("imageless")["spec"], "the stored run is never rewritten"


def test_spec_changes_reach_only_stages_not_yet_started(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    stages = [
        stage(
            "sft",
            "sft",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
            hyperparameters={"learning_rate": 1e-4},
            podAnnotations={KWOK_RUN_SECONDS: "4"},
        ),
        stage(
            "dpo",
            "dpo",
            inputs={"model": src("sft"), "data": uri("s3://d00/prefs")},
            hyperparameters={"beta": 0.1},
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="edit"))
    wait_until("sft to run", lambda: reader.stage("edit", "sft").get("phase") == "Running", timeout=60)
    change = [
        {"op": "replace", "path": "/spec/stages/0/hyperparameters", "value": {"learning_rate": 2e-4}},
        {"op": "replace", "path": "/spec/stages/1/hyperparameters", "value": {"beta": 0.5}},
    ]
    cluster.kubectl("patch", "alr", "edit", "-n", namespace, "--type=json", "-p", json.dumps(change))
    status = reader.wait_phase("edit", "Succeeded", timeout=60)
    assert status["observedGeneration"] == 2

    def hyperparameters(job: str) -> Any:
        return json.loads(reader.kube.get("ConfigMap", namespace, job)["data"]["stage.json"])[
            "hyperparameters"
        ]

    assert hyperparameters("edit-sft-1") == {"learning_rate": 1e-4}
    assert hyperparameters("edit-dpo-1") == {"beta": 0.5}
    jobs = reader.jobs("edit")
    assert jobs["edit-sft-1"]["metadata"]["annotations"]["kubealign.io/spec-generation"] == "1"
    assert jobs["edit-dpo-1"]["metadata"]["annotations"]["kubealign.io/spec-generation"] == "2"


def test_operator_runs_with_only_the_rbac_rules_it_ships(
    cluster: Cluster, namespace: str, crd: None, reader: Reader, tmp_path: Path
) -> None:
    """The operator under a ServiceAccount bound to a Role of rbac/rules.yaml, and nothing more."""
    rules = yaml.safe_load((REPO_ROOT / "operator" / "kubealign" / "rbac" / "rules.yaml").read_text())
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "kubealign-operator"},
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "kubealign-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubealign-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubealign-operator", "namespace": namespace}],
    }
    cluster.kubectl("create", "serviceaccount", "kubealign-operator", "-n", namespace)
    for obj in (role, binding):
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))
    token = cluster.kubectl(
        "create", "token", "kubealign-operator", "-n", namespace, "--duration=1h"
    ).stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    if "certificate-authority" in server:
        server = {
            **server,
            "certificate-authority-data": base64.b64encode(
                Path(server.pop("certificate-authority")).read_bytes()
            ).decode(),
        }
    restricted = tmp_path / "operator.kubeconfig"
    restricted.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": server}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "operator",
                        "context": {"cluster": "c", "user": "operator", "namespace": namespace},
                    }
                ],
                "current-context": "operator",
            }
        )
    )
    stages = [
        stage(
            "sft",
            "sft",
            inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
            podAnnotations={KWOK_MESSAGE: '{"ok": 1}'},
        ),
        stage(
            "dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://d00/prefs")}, resources={"nodes": 2}
        ),
    ]
    submit(cluster, namespace, manifest(stages, name="rbac"))
    with operator_thread(cluster, namespace, kubeconfig=str(restricted)) as running:
        status = reader.wait_phase("rbac", "Succeeded", timeout=90)
        assert running.kube.requests  # the operator itself did the work, as the service account
    assert status["stages"][0]["metrics"] == {"ok": 1}
    assert "StageSucceeded" in reader.reasons("rbac")


def test_queued_jobs_wait_for_kueue_admission(
    cluster: Cluster, namespace: str, operator: Any, reader: Reader
) -> None:
    """With queueName, Jobs are created suspended and stay Queued until admitted (Kueue unsuspends
    them; here the test plays Kueue). The operator never unsuspends them itself."""
    stages = [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://d00/prefs")}),
    ]
    submit(cluster, namespace, manifest(stages, name="queued", queueName="gpu-queue"))
    for name in ("sft", "dpo"):
        job_name = f"queued-{name}-1"

        def phase(name: str = name) -> str:
            return str(reader.stage("queued", name).get("phase"))

        wait_until(f"{name} to be queued", lambda: phase() == "Queued")
        status = reader.status("queued")
        assert (status["phase"], status["runningStages"]) == ("Running", f"{name}(queued)")
        job = reader.jobs("queued")[job_name]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        time.sleep(2)  # a queued Job is not stuck: nothing happens to it while it waits
        assert reader.jobs("queued")[job_name]["spec"]["suspend"] is True
        assert phase() == "Queued"
        admit = '{"spec": {"suspend": false}}'
        cluster.kubectl("patch", "job", job_name, "-n", namespace, "--type=merge", "-p", admit)
        wait_until(f"{name} to succeed", lambda: phase() == "Succeeded")
    reader.wait_phase("queued", "Succeeded")
    assert "StageQueued" in reader.reasons("queued")
