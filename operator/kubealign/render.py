"""Pure builders of a stage's children: the stage-config ConfigMap, the headless Service and the Job.

``build_children(run, stage, attempt)`` returns plain dicts ready for the API, in creation order.
Names are deterministic (``<run>-<stage>-<attempt>``, hashed down when long), so creating them twice
is harmless and a restarted operator finds what it made by name and label.

The stage-config document is ``kubealign_jobs.config.StageConfig``: the one contract with the
trainer. Only that stdlib-only module of the data plane is imported here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from kubealign.api import API_VERSION, KIND, AlignmentRun, InputSource, Stage
from kubealign_jobs.config import (
    DEFAULT_CONFIG_PATH,
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    JUDGE_API_KEY_ENV,
    TERMINATION_MESSAGE_PATH,
    Distributed,
    Inputs,
    StageConfig,
    StorageSettings,
    Tracking,
    artifact_uri,
    checkpoints_uri,
)
from kubealign_jobs.stages import CATALOGUE

MANAGED_BY: Final = "kubealign-operator"
LABEL_RUN: Final = "kubealign.io/run"
LABEL_STAGE: Final = "kubealign.io/stage"
LABEL_ATTEMPT: Final = "kubealign.io/attempt"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
ANNOTATION_GENERATION: Final = "kubealign.io/spec-generation"
COMPLETION_INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL: Final = "batch.kubernetes.io/job-name"

CONTAINER_NAME: Final = "trainer"
CONFIG_KEY: Final = "stage.json"
CONFIG_DIR: Final = DEFAULT_CONFIG_PATH.rsplit("/", 1)[0]
SCRATCH_DIR: Final = "/scratch"
MASTER_PORT: Final = 29500
GPU_RESOURCE: Final = "nvidia.com/gpu"
RUN_AS_USER: Final = 1000

# Indexed pods are named <job>-<index> and their hostnames must stay DNS labels (63 characters);
# 52 leaves room for "-<index>" with up to 10 digits.
MAX_JOB_NAME: Final = 52
_HASH_LENGTH: Final = 8


def job_name(run: str, stage: str, attempt: int) -> str:
    """The deterministic name of a stage attempt's Job, ConfigMap and Service."""
    name = f"{run}-{stage}-{attempt}"
    if len(name) <= MAX_JOB_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    suffix = f"-{digest}-{attempt}"
    return name[: MAX_JOB_NAME - len(suffix)].rstrip("-") + suffix


def stage_output(run: AlignmentRun, stage: Stage) -> str:
    """The stage's output prefix: ``<storage.uri>/<namespace>/<run>/<stage>``."""
    return f"{run.spec.storage.uri.rstrip('/')}/{run.namespace}/{run.name}/{stage.name}"


def stage_artifact(run: AlignmentRun, stage: Stage) -> str:
    return artifact_uri(stage_output(run, stage))


def _resolve(run: AlignmentRun, source: InputSource | None) -> str | None:
    if source is None:
        return None
    if source.from_stage is not None:
        return stage_artifact(run, run.spec.stage(source.from_stage))
    return source.uri


def nproc_per_node(stage: Stage) -> int:
    return max(1, stage.resources.gpus_per_node)


def stage_config(run: AlignmentRun, stage: Stage) -> StageConfig:
    """The document the trainer reads: resolved input URIs, output prefix, resume location."""
    inputs = stage.inputs
    model = _resolve(run, inputs.model)
    output = stage_output(run, stage)
    return StageConfig(
        run=run.name,
        stage=stage.name,
        type=stage.type,
        output=output,
        namespace=run.namespace,
        inputs=Inputs(
            model=model,
            data=_resolve(run, inputs.data),
            eval_data=_resolve(run, inputs.eval_data),
            reward_model=_resolve(run, inputs.reward_model),
            reference=_resolve(run, inputs.reference) or model,
            policies={p.policy_name: _resolve(run, p) or "" for p in inputs.policies},
        ),
        hyperparameters=_resolved_hyperparameters(run, stage),
        # Every attempt resumes from the same place, so a retry continues where the last one stopped.
        resume=checkpoints_uri(output),
        storage=StorageSettings(endpoint=run.spec.storage.endpoint, region=run.spec.storage.region),
        distributed=Distributed(nnodes=stage.resources.nodes, nproc_per_node=nproc_per_node(stage)),
        seed=run.spec.seed if stage.seed is None else stage.seed,
        tracking=_tracking(run),
    )


def _resolved_hyperparameters(run: AlignmentRun, stage: Stage) -> dict[str, Any]:
    """The stage's hyperparameters, with an in-pod judge ``from`` a stage as that stage's artifact."""
    hyperparameters = dict(stage.hyperparameters)
    if stage.inputs.judge is not None:
        judge = dict(hyperparameters["judge"])
        judge["model"] = {"uri": _resolve(run, stage.inputs.judge)}
        hyperparameters["judge"] = judge
    return hyperparameters


def _tracking(run: AlignmentRun) -> Tracking:
    mlflow = run.spec.mlflow
    if mlflow is None:
        return Tracking(run_uid=run.uid)
    return Tracking(mlflow_uri=mlflow.uri, experiment=mlflow.experiment, run_uid=run.uid)


def labels(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubealign",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/component": stage.type,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: run.name,
        LABEL_STAGE: stage.name,
        LABEL_ATTEMPT: str(attempt),
    }


def run_selector(run_name: str) -> str:
    """The label selector of everything the operator made for one run."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_RUN}={run_name}"


def owner_reference(run: AlignmentRun) -> dict[str, Any]:
    # controller=true lets the garbage collector delete children with the run and tells tools
    # which object manages them; blockOwnerDeletion keeps foreground deletion honest.
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, Any]:
    return {
        "name": job_name(run.name, stage.name, attempt),
        "namespace": run.namespace,
        "labels": labels(run, stage, attempt),
        "ownerReferences": [owner_reference(run)],
    }


def build_configmap(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, Any]:
    """The stage config, mounted read-only at /etc/kubealign/stage.json."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, stage, attempt),
        "immutable": True,
        "data": {CONFIG_KEY: stage_config(run, stage).to_json()},
    }


def build_service(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, Any] | None:
    """The headless Service that gives indexed pods stable DNS names; None for single-node stages."""
    if stage.resources.nodes <= 1:
        return None
    name = job_name(run.name, stage.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, stage, attempt),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: name},
            # Rank 0 must be resolvable before it is Ready: rendezvous happens during startup.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def trainer_args(stage: Stage, config_path: str = DEFAULT_CONFIG_PATH) -> list[str]:
    """``-m <the catalogue's module> --config <path>``: how every door starts a stage's trainer."""
    return ["-m", CATALOGUE[stage.type].module, "--config", config_path]


def _command(stage: Stage) -> list[str]:
    tail = trainer_args(stage)
    if stage.resources.nodes > 1:
        # $(VAR) is expanded by the kubelet from the container's env.
        return [
            "torchrun",
            "--nnodes=$(NNODES)",
            "--node-rank=$(NODE_RANK)",
            "--nproc-per-node=$(NPROC_PER_NODE)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            *tail,
        ]
    if stage.resources.gpus_per_node > 1:
        return [
            "torchrun",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={stage.resources.gpus_per_node}",
            *tail,
        ]
    return ["python", *tail]


def trainer_env(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, str]:
    """The trainer's environment that does not depend on where it runs (a pod or the local runner)."""
    env = {
        "KUBEALIGN_RUN": run.name,
        "KUBEALIGN_STAGE": stage.name,
        "KUBEALIGN_ATTEMPT": str(attempt),
        "KUBEALIGN_JOB": job_name(run.name, stage.name, attempt),
        # No HF_HUB_OFFLINE: hf:// inputs reach the hub; every other model loads from a local
        # folder with local_files_only, so nothing else can.
        "PYTHONUNBUFFERED": "1",
    }
    if run.spec.storage.endpoint:
        env["AWS_ENDPOINT_URL"] = run.spec.storage.endpoint
    if run.spec.storage.region:
        env["AWS_DEFAULT_REGION"] = run.spec.storage.region
    return env


def _env(run: AlignmentRun, stage: Stage, attempt: int) -> list[dict[str, Any]]:
    storage = run.spec.storage
    env: list[dict[str, Any]] = [
        {"name": name, "value": value} for name, value in trainer_env(run, stage, attempt).items()
    ]
    # The root filesystem is read-only: everything that caches goes to the scratch volume.
    env += [
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/huggingface"},
        {"name": "TMPDIR", "value": "/tmp"},
    ]
    if storage.secret_name:
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", storage.secret_name, optional=False),
            _secret_env("AWS_SECRET_ACCESS_KEY", storage.secret_name, optional=False),
            _secret_env("AWS_SESSION_TOKEN", storage.secret_name, optional=True),
        ]
    if run.spec.mlflow is not None and run.spec.mlflow.secret_name:
        env += [
            _secret_env(key, run.spec.mlflow.secret_name, optional=True)
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
        ]
    judge = stage.hyperparameters.get("judge")
    secret = judge.get("secretRef") if isinstance(judge, dict) else None
    if isinstance(secret, dict) and secret.get("name"):
        # The judge server's API key (evaluate's hyperparameters.judge.secretRef), by reference.
        key = {"name": str(secret["name"]), "key": str(secret.get("key") or "apiKey")}
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": key}})
    if run.spec.hub_token is not None:
        token = run.spec.hub_token
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}
        )
    if stage.resources.nodes > 1:
        name = job_name(run.name, stage.name, attempt)
        env += [
            {"name": "NNODES", "value": str(stage.resources.nodes)},
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
                },
            },
            {"name": "NPROC_PER_NODE", "value": str(nproc_per_node(stage))},
            {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
            {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        ]
    return env


def _secret_env(key: str, secret: str, *, optional: bool) -> dict[str, Any]:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def _resources(stage: Stage) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    wanted = stage.resources
    if wanted.cpu is not None:
        requests["cpu"] = wanted.cpu
    if wanted.memory is not None:
        # Memory is limited at the request: an overcommitted trainer is OOM-killed, not its neighbours.
        requests["memory"] = limits["memory"] = wanted.memory
    if wanted.gpus_per_node > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(wanted.gpus_per_node)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _pod_spec(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, Any]:
    name = job_name(run.name, stage.name, attempt)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": stage.image or run.spec.image,
        "command": _command(stage),
        "workingDir": SCRATCH_DIR,
        "env": _env(run, stage, attempt),
        "resources": _resources(stage),
        "volumeMounts": [
            {"name": "stage-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # The trainer writes its final metrics here; on a crash the log tail says why instead.
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Trainers never talk to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "stage-config",
                "configMap": {"name": name, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
            },
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            # NCCL and DataLoader workers need more shared memory than the runtime's default 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if run.spec.service_account_name:
        spec["serviceAccountName"] = run.spec.service_account_name
    if run.spec.priority_class_name:
        spec["priorityClassName"] = run.spec.priority_class_name
    if stage.node_selector:
        spec["nodeSelector"] = dict(stage.node_selector)
    if stage.tolerations:
        spec["tolerations"] = [dict(t) for t in stage.tolerations]
    if stage.resources.nodes > 1:
        spec["subdomain"] = name
    spec["terminationGracePeriodSeconds"] = stage.termination_grace_seconds
    return spec


def build_job(run: AlignmentRun, stage: Stage, attempt: int) -> dict[str, Any]:
    """One attempt of a stage. The operator owns retries, so the Job itself never retries a pod."""
    nodes = stage.resources.nodes
    metadata = _metadata(run, stage, attempt)
    metadata["annotations"] = {ANNOTATION_GENERATION: str(run.generation)}
    if run.spec.queue_name:
        metadata["labels"][LABEL_QUEUE] = run.spec.queue_name
    annotations: dict[str, str] = {**run.spec.pod_annotations, **stage.pod_annotations}
    template_metadata: dict[str, Any] = {"labels": labels(run, stage, attempt)}
    if annotations:
        template_metadata["annotations"] = annotations
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": nodes,
        "parallelism": nodes,
        # Kueue admits a queued Job by unsuspending it; without a queue it starts right away.
        "suspend": bool(run.spec.queue_name),
        "podFailurePolicy": {
            "rules": [
                # A pod evicted by preemption or a node drain is recreated instead of failing the attempt.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # So is one whose trainer was told to stop (SIGTERM) and checkpointed before exiting.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": [EXIT_STOPPED],
                    },
                },
                # A configuration or data error fails the same way every time: fail the Job (reason
                # PodFailurePolicy), and the operator does not retry it.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": [EXIT_BAD_INPUT],
                    },
                },
            ]
        },
        "template": {"metadata": template_metadata, "spec": _pod_spec(run, stage, attempt)},
    }
    if nodes > 1:
        spec["completionMode"] = "Indexed"
    if stage.timeout_seconds is not None:
        spec["activeDeadlineSeconds"] = stage.timeout_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def build_children(run: AlignmentRun, stage: Stage, attempt: int) -> tuple[dict[str, Any], ...]:
    """Everything one attempt needs, in creation order: the Job last, once what it mounts exists."""
    service = build_service(run, stage, attempt)
    children = [build_configmap(run, stage, attempt)]
    if service is not None:
        children.append(service)
    children.append(build_job(run, stage, attempt))
    return tuple(children)


def compact_json(value: Any, limit: int = 256) -> str:
    """A short one-line JSON rendering for event messages."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
