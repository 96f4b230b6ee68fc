"""The whole chain, for real: manifest -> operator -> Jobs -> pods running the trainer -> S3 -> status.

One AlignmentRun with every stage type on tiny models (pretrain -> sft -> reward -> generate, labelled
by the reward model -> dpo on the generated pairs, ppo against the reward model, side by side ->
evaluate) is applied to the local control plane. The chart is installed with Helm, and the operator
runs as a process with its Deployment's args and env (the S3 defaults among them), holding only the
chart's ServiceAccount token (from the TokenRequest API), so the chart's RBAC is shown to be enough.
Every stage's pod is bound to the node agent's node and runs the real trainer, which reads its S3
credentials from the Secret the pod references (neither the operator nor the agent has them). The
sft stage is preempted (SIGKILL) once its first checkpoint is published: the operator retries it,
the retry resumes from that checkpoint, and the run still succeeds.

    .venv/bin/python -m pytest tests/e2e/test_e2e.py -s     # prints the wall time of the run
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import localcluster
from kubealign import crdgen
from tests.e2e.agent_fixture import RunningAgent, node_agent
from tests.processes import free_port, serving

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubealign"
EXAMPLE_DATA = ROOT / "examples" / "sentiment" / "data"
RELEASE = "kubealign"
RUN = "e2e"
PREEMPTED_STAGE = "sft"
RUN_TIMEOUT_SECONDS = 420

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

# Tiny everywhere: the point is the chain, not the model. Checkpoints are frequent so that the
# preempted stage has one to resume from, and there are enough steps after it for the kill to land.
TINY_MODEL = {
    "arch": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
STAGES: list[dict[str, Any]] = [
    {
        "name": "pretrain",
        "type": "pretrain",
        "inputs": {"data": {"uri": "DATA/corpus.txt"}},
        "hyperparameters": {
            "model": TINY_MODEL,
            "vocab_size": 320,
            "block_size": 64,
            "max_steps": 10,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_steps": 0,
        },
    },
    {
        "name": "sft",
        "type": "sft",
        "inputs": {"model": {"from": "pretrain"}, "data": {"uri": "DATA/sft.jsonl"}},
        "hyperparameters": {
            "max_steps": 16,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "max_length": 64,
            "checkpoint_every": 4,
            "log_every": 4,
            "warmup_steps": 0,
        },
    },
    {
        "name": "reward",
        "type": "reward",
        "inputs": {"model": {"from": "sft"}, "data": {"uri": "DATA/preferences.jsonl"}},
        "hyperparameters": {
            "max_steps": 6,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "max_length": 64,
            "warmup_steps": 0,
            "eval_fraction": 0.0,
        },
    },
    {
        # Sample answers from the SFT policy and let the reward model label them: RLHF's data step.
        "name": "generate",
        "type": "generate",
        "inputs": {
            "model": {"from": "sft"},
            "rewardModel": {"from": "reward"},
            "data": {"uri": "DATA/prompts.jsonl"},
        },
        "hyperparameters": {
            "samples_per_prompt": 4,
            "max_new_tokens": 12,
            "max_prompts": 16,
            "batch_size": 64,
        },
    },
    {
        "name": "dpo",
        "type": "dpo",
        "inputs": {"model": {"from": "sft"}, "data": {"from": "generate"}},
        "hyperparameters": {
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "max_length": 64,
            "warmup_steps": 0,
        },
    },
    {
        "name": "ppo",
        "type": "ppo",
        "inputs": {
            "model": {"from": "sft"},
            "rewardModel": {"from": "reward"},
            "data": {"uri": "DATA/prompts.jsonl"},
        },
        "hyperparameters": {
            "steps": 3,
            "rollout_batch_size": 8,
            "mini_batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 12,
            "learning_rate": 1e-4,
        },
    },
    {
        "name": "evaluate",
        "type": "evaluate",
        "inputs": {
            "model": {"from": "sft"},
            "policies": [{"from": "dpo"}, {"from": "ppo"}],
            "rewardModel": {"from": "reward"},
            "data": {"uri": "DATA/eval_prompts.jsonl"},
        },
        "hyperparameters": {
            "scorer": "vader",
            "temperatures": [1.0],
            "max_new_tokens": 12,
            "max_prompts": 8,
            "best_of_n": 2,
            "plot": False,
        },
    },
]
# Stage types whose artifact is a save_pretrained model (reward: a one-label sequence classifier).
MODEL_TYPES = ("pretrain", "sft", "reward", "dpo", "ppo")


def _helm(cluster: Any, *args: str) -> str:
    helm = localcluster.BINARY_BY_NAME["helm"].path()
    command = [str(helm), *args, f"--kubeconfig={cluster.kubeconfig}", f"--kube-context={cluster.context}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def operator_namespace(kube_api: Any, namespace: str) -> Iterator[str]:
    """Where the chart is installed; runs live in ``namespace``, as a platform team would split it."""
    core: Any = client.CoreV1Api(kube_api)
    name = f"{namespace[:50]}-op"
    core.create_namespace({"metadata": {"name": name, "labels": {"kubealign.io/test": "true"}}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name, propagation_policy="Background")


def service_account_kubeconfig(
    kube_api: Any, cluster: Any, *, namespace: str, account: str, path: Path
) -> Path:
    """A kubeconfig holding only a TokenRequest token of ``account``: the identity the chart creates."""
    core: Any = client.CoreV1Api(kube_api)
    request = core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "e2e",
                "cluster": {
                    "server": server["server"],
                    "certificate-authority-data": server["certificate-authority-data"],
                },
            }
        ],
        "users": [{"name": account, "user": {"token": request.status.token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": account}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class ChartOperator:
    """What the installed chart's Deployment would run: its container's args and env, and its ports."""

    args: list[str]
    env: dict[str, str]
    health_port: int
    metrics_port: int


def chart_operator(kube_api: Any, namespace: str) -> ChartOperator:
    apps: Any = client.AppsV1Api(kube_api)
    container = apps.read_namespaced_deployment(RELEASE, namespace).spec.template.spec.containers[0]
    ports = {port.name: port.container_port for port in container.ports}
    return ChartOperator(
        # The Deployment listens on every interface of its pod; here, loopback is enough.
        args=[arg.replace("0.0.0.0", "127.0.0.1") for arg in container.args],
        # What the kubelet would set: plain values, and the downward API's namespace (POD_NAMESPACE).
        env={
            item.name: item.value
            if item.value is not None
            else {"metadata.namespace": namespace}[item.value_from.field_ref.field_path]
            for item in container.env or []
        },
        health_port=ports["health"],
        metrics_port=ports["metrics"],
    )


@contextlib.contextmanager
def operator_process(chart: ChartOperator, kubeconfig: Path, log: Path) -> Iterator[None]:
    """``kubealign operator`` as a process with the chart's args and env, until it reports healthy."""
    command = [
        str(Path(sys.executable).parent / "kubealign"),
        "operator",
        *chart.args,
        f"--kubeconfig={kubeconfig}",
        # Only the resync safety net is tightened (30s by default), to keep the test short.
        "--resync-seconds=5",
    ]
    # Only the ServiceAccount's kubeconfig, and no S3 credentials: the operator never needs them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "KUBECONFIG"}
    env.update(chart.env)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    with serving(
        process,
        ready=lambda: _healthy(f"http://127.0.0.1:{chart.health_port}/healthz"),
        what="the operator (health endpoint)",
        log=log,
        start_timeout=60,
        stop_timeout=20,
        poll=0.2,
    ):
        yield


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def upload_data(s3: Any, bucket: str) -> str:
    """Slices of the sentiment example, plus preference pairs built from its sentiment words."""

    def head(name: str, lines: int) -> bytes:
        return ("\n".join((EXAMPLE_DATA / name).read_text().splitlines()[:lines]) + "\n").encode()

    subjects = ["The film", "The ending", "The cast", "Overall, the plot", "The soundtrack", "The villain"]
    good = ["was wonderful.", "felt charming.", "is lovely and fun.", "was the best this year."]
    bad = ["was awful.", "felt painful.", "is ugly and loud.", "was the worst this year."]
    preferences = [
        {"prompt": subject, "chosen": " " + good[i % 4], "rejected": " " + bad[(i + 1) % 4]}
        for i, subject in enumerate(subjects * 4)
    ]
    files = {
        "preferences.jsonl": "".join(json.dumps(row) + "\n" for row in preferences).encode(),
        "corpus.txt": head("corpus.txt", 400),
        "sft.jsonl": head("sft.jsonl", 96),
        "prompts.jsonl": head("prompts.jsonl", 16),
        "eval_prompts.jsonl": head("eval_prompts.jsonl", 8),
    }
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"data/{name}", Body=body)
    return f"s3://{bucket}/data"


def run_manifest(*, data: str, storage: str, agent: RunningAgent) -> dict[str, Any]:
    stages = json.loads(json.dumps(STAGES).replace("DATA/", data + "/"))
    for stage in stages:
        stage["nodeSelector"] = agent.node_selector
        stage["tolerations"] = agent.tolerations
        stage["maxRetries"] = 1
        stage["resources"] = {"cpu": "1", "memory": "2Gi"}
    return {
        "apiVersion": "kubealign.io/v1alpha1",
        "kind": "AlignmentRun",
        "metadata": {"name": RUN},
        "spec": {
            # The node agent runs the checkout's code; the image is what a real node would pull.
            "image": "ghcr.io/kubealign/kubealign-trainer:0.1.0",
            # Endpoint, region and credentials Secret come from the chart's s3.* defaults.
            "storage": {"uri": storage},
            "stages": stages,
        },
    }


def wait_for_run(custom: Any, namespace: str, *, agent: RunningAgent, operator_log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        run = custom.get_namespaced_custom_object("kubealign.io", "v1alpha1", namespace, "alignmentruns", RUN)
        status = run.get("status") or {}
        summary = f"{status.get('phase')} {status.get('progress')} {status.get('runningStages')}"
        if summary != last:
            print(f"[{time.strftime('%H:%M:%S')}] run {summary}", flush=True)
            last = summary
        if status.get("phase") in ("Succeeded", "Failed"):
            return dict(run)
        time.sleep(1)
    pytest.fail(
        f"run did not finish in {RUN_TIMEOUT_SECONDS}s; status:\n{json.dumps(status, indent=1)}\n"
        f"operator log:\n{operator_log.read_text()[-6000:]}\n"
        f"node agent log:\n{agent.log.read_text()[-4000:]}\npod logs:\n{agent.pod_logs()}"
    )


def download(s3: Any, uri: str, dest: Path) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for item in page.get("Contents", []):
            target = dest / item["Key"][len(prefix) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
    return dest


def scrape(port: int, *, until: str | None = None, timeout: float = 15.0) -> str:
    """The operator's metrics; with ``until``, polled until that sample shows up (or ``timeout``).

    The operator updates its metrics right after it writes a status, so a reader that saw the
    status may scrape a moment before the gauges follow.
    """
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = str(response.read().decode())
        if until is None or until in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def assert_chart_policy_refuses_a_typo(custom: Any, namespace: str, manifest: dict[str, Any]) -> None:
    """The chart's admission policy refuses a misspelt hyperparameter (once the API server loaded it)."""
    typo = json.loads(json.dumps(manifest))
    index = next(i for i, s in enumerate(typo["spec"]["stages"]) if s["type"] == "ppo")
    typo["spec"]["stages"][index].setdefault("hyperparameters", {})["ppo_epoch"] = 2
    deadline = time.monotonic() + 30
    message = ""
    while time.monotonic() < deadline:
        try:
            custom.create_namespaced_custom_object(
                "kubealign.io", "v1alpha1", namespace, "alignmentruns", typo, dry_run="All"
            )
        except ApiException as exc:
            message = str(exc.body)
            break
        time.sleep(0.5)
    assert f"spec.stages[{index}].hyperparameters.ppo_epoch" in message, message
    assert "did you mean ppo_epochs?" in message


def test_alignment_run_end_to_end(
    cluster: Any,
    kube_api: Any,
    namespace: str,
    *,
    operator_namespace: str,
    s3_server: Any,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    core: Any = client.CoreV1Api(kube_api)
    custom: Any = client.CustomObjectsApi(kube_api)

    # The chart owns the hyperparameter admission policy, as on a fresh cluster: drop the copy the
    # cluster tests applied with kubectl (Helm refuses to adopt an object it did not create).
    cluster.kubectl(
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        crdgen.POLICY_NAME,
        "--ignore-not-found",
    )
    _helm(
        cluster,
        "install",
        RELEASE,
        str(CHART),
        f"--namespace={operator_namespace}",
        f"--set=watchNamespaces={{{namespace}}}",
        f"--set=s3.endpoint={s3_server.endpoint}",
        f"--set=s3.region={s3_server.region}",
        "--set=s3.credentialsSecret=s3",
        f"--set=health.port={free_port()}",
        f"--set=health.readyPort={free_port()}",
        f"--set=metrics.port={free_port()}",
    )
    chart = chart_operator(kube_api, operator_namespace)
    kubeconfig = service_account_kubeconfig(
        kube_api,
        cluster,
        namespace=operator_namespace,
        account=RELEASE,
        path=tmp_path / "operator.kubeconfig",
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3"},
            "data": {
                key: base64.b64encode(value.encode()).decode()
                for key, value in {
                    "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key,
                }.items()
            },
        },
    )
    data = upload_data(s3, bucket)
    storage = f"s3://{bucket}/runs"
    operator_log = tmp_path / "operator.log"

    with (
        node_agent(cluster.kubeconfig, tmp_path, f"--preempt-stage={PREEMPTED_STAGE}") as agent,
        operator_process(chart, kubeconfig, operator_log),
    ):
        manifest = run_manifest(data=data, storage=storage, agent=agent)
        assert_chart_policy_refuses_a_typo(custom, namespace, manifest)
        custom.create_namespaced_custom_object(
            "kubealign.io", "v1alpha1", namespace, "alignmentruns", manifest
        )
        run = wait_for_run(custom, namespace, agent=agent, operator_log=operator_log)
        elapsed = time.monotonic() - started
        metrics_text = scrape(chart.metrics_port, until='kubealign_alignmentruns{phase="Succeeded"} 1.0')
    print(f"e2e: run {run['status']['phase']} after {elapsed:.1f}s wall time (chart install included)")

    status = run["status"]
    assert status["phase"] == "Succeeded", (
        f"{json.dumps(status, indent=1)}\noperator log:\n{operator_log.read_text()[-6000:]}\n"
        f"pod logs:\n{agent.pod_logs()}"
    )
    stages = {stage["name"]: stage for stage in status["stages"]}
    assert sorted(stages) == sorted(stage["name"] for stage in STAGES)
    for name, stage in stages.items():
        assert stage["phase"] == "Succeeded", stage
        assert stage["output"] == f"{storage}/{namespace}/{RUN}/{name}/artifact"
        assert stage.get("metrics"), f"stage {name} reported no metrics"
        assert stage["startTime"] <= stage["completionTime"]
        expected_attempts = 2 if name == PREEMPTED_STAGE else 1
        assert stage["attempts"] == expected_attempts, f"stage {name}: {stage}"

    # Every pod ran on the agent's node: nothing was faked by kwok.
    pods = core.list_namespaced_pod(namespace, label_selector=f"kubealign.io/run={RUN}").items
    assert {pod.spec.node_name for pod in pods} == {agent.node_name}
    assert len(pods) == len(STAGES) + 1

    # The retry resumed from the checkpoint the preempted attempt had published.
    retry_logs = [
        path
        for path in agent.work_dir.glob("*/container.log")
        if f"_{RUN}-{PREEMPTED_STAGE}-" in path.parent.name
    ]
    events = [
        json.loads(line)
        for path in retry_logs
        for line in path.read_text().splitlines()
        if line.startswith("{") and '"event"' in line
    ]
    resumed = [event for event in events if event.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] > 0, (
        f"no resume from a checkpoint in the {PREEMPTED_STAGE} logs: {events}"
    )

    # Artifacts: complete (manifest written last) and loadable with plain transformers.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for name in stages:
        key = f"runs/{namespace}/{RUN}/{name}/artifact/_MANIFEST.json"
        s3.head_object(Bucket=bucket, Key=key)
    for name, stage in stages.items():
        if stage["type"] not in MODEL_TYPES:
            continue
        local = download(s3, stage["output"], tmp_path / "artifacts" / name)
        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)  # type: ignore[no-untyped-call]
        assert tokenizer("The film was").input_ids
        if stage["type"] == "reward":
            reward = AutoModelForSequenceClassification.from_pretrained(local, local_files_only=True)
            assert reward.config.num_labels == 1
        else:
            model = AutoModelForCausalLM.from_pretrained(local, local_files_only=True)
            assert model.config.hidden_size == TINY_MODEL["hidden_size"]

    # The data stages' artifacts hold what the next stages read.
    generated = s3.get_object(
        Bucket=bucket, Key=f"runs/{namespace}/{RUN}/generate/artifact/preferences.jsonl"
    )
    pairs = [json.loads(line) for line in generated["Body"].read().decode().splitlines()]
    assert pairs and all(pair["chosen_score"] > pair["rejected_score"] for pair in pairs)
    results = s3.get_object(Bucket=bucket, Key=f"runs/{namespace}/{RUN}/evaluate/artifact/results.json")
    assert {"dpo", "ppo"} <= set(json.loads(results["Body"].read())["policies"])

    # The chart's RBAC was enough: no request of the operator's was refused, by kopf or the reconciler.
    assert "Forbidden" not in operator_log.read_text(), operator_log.read_text()[-4000:]
    assert "kubealign_reconcile_errors_total{" not in metrics_text, metrics_text

    # The operator's metrics saw the same story.
    assert 'kubealign_alignmentruns{phase="Succeeded"} 1.0' in metrics_text
    assert f'kubealign_stage_retries_total{{type="{PREEMPTED_STAGE}"}} 1.0' in metrics_text
    for stage in STAGES:
        line = f'kubealign_stage_duration_seconds_count{{phase="Succeeded",type="{stage["type"]}"}} 1.0'
        assert line in metrics_text, metrics_text
