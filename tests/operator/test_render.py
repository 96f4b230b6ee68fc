"""kubealign.render: the children of one stage attempt, as pure dicts. Table-driven where it pays."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubealign import api, render
from kubealign_jobs import stages as stages_module
from kubealign_jobs.config import EXIT_BAD_INPUT, EXIT_STOPPED, StageConfig
from tests.operator.run_builders import IMAGE, STORAGE, UID, manifest, pipeline, run, src, stage, uri


def _env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _container(job: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize(
    ("run_name", "stage_name", "attempt", "expected"),
    [
        ("demo", "sft", 1, "demo-sft-1"),
        ("demo", "sft", 12, "demo-sft-12"),
        ("a" * 30, "b" * 19, 1, "a" * 30 + "-" + "b" * 19 + "-1"),  # 52 characters: kept whole
    ],
)
def test_job_name_is_deterministic(run_name: str, stage_name: str, attempt: int, expected: str) -> None:
    assert render.job_name(run_name, stage_name, attempt) == expected


def test_long_job_names_are_hashed_within_the_limit_and_stay_distinct() -> None:
    names = {render.job_name("r" * 63, "s" * 40, attempt) for attempt in range(1, 12)}
    names |= {render.job_name("r" * 63, "t" * 40, 1)}
    assert len(names) == 12
    for name in names:
        assert len(name) <= render.MAX_JOB_NAME
        assert name[0].isalpha() and name[-1].isalnum() and "--" not in name
    assert render.job_name("r" * 63, "s" * 40, 7).endswith("-7")


def test_stage_config_resolves_inputs_outputs_and_resume() -> None:
    config = render.stage_config(run(), run().spec.stage("ppo"))
    prefix = f"{STORAGE}/team-a/demo"
    assert config.output == f"{prefix}/ppo"
    assert config.resume == f"{prefix}/ppo/checkpoints"
    assert config.inputs.model == f"{prefix}/sft/artifact"
    assert config.inputs.reference == config.inputs.model  # defaults to the model input
    assert config.inputs.reward_model == f"{prefix}/reward/artifact"
    assert config.inputs.data == "s3://data/prompts"
    evaluate = render.stage_config(run(), run().spec.stage("evaluate"))
    assert evaluate.inputs.policies == {
        "dpo": f"{prefix}/dpo/artifact",
        "ppo": f"{prefix}/ppo/artifact",
        "base": "s3://models/base",
    }


def test_configmap_holds_the_stage_config_the_trainer_parses() -> None:
    alr = run(manifest(storage={"uri": "s3://b00/p/", "endpoint": "http://minio:9000", "region": "eu-1"}))
    cm = render.build_configmap(alr, alr.spec.stage("sft"), 2)
    assert cm["metadata"]["name"] == "demo-sft-2"
    parsed = StageConfig.from_json(cm["data"]["stage.json"])
    assert parsed.output == "s3://b00/p/team-a/demo/sft"
    assert (parsed.storage.endpoint, parsed.storage.region) == ("http://minio:9000", "eu-1")
    assert parsed == render.stage_config(alr, alr.spec.stage("sft"))


def test_job_metadata_labels_and_owner() -> None:
    alr = run()
    job = render.build_job(alr, alr.spec.stage("dpo"), 3)
    meta = job["metadata"]
    assert meta["name"] == "demo-dpo-3"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "kubealign",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "dpo",
        "app.kubernetes.io/managed-by": "kubealign-operator",
        "kubealign.io/run": "demo",
        "kubealign.io/stage": "dpo",
        "kubealign.io/attempt": "3",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubealign.io/v1alpha1",
            "kind": "AlignmentRun",
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]


def test_single_node_job_spec() -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")}, resources={"gpusPerNode": 1})]))
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["completions"], spec["parallelism"], spec["suspend"]) == (
        0,
        1,
        1,
        False,
    )
    assert "completionMode" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert "subdomain" not in pod
    container = _container(job)
    assert container["image"] == IMAGE
    assert container["command"] == [
        "python",
        "-m",
        "kubealign_jobs.sft",
        "--config",
        "/etc/kubealign/stage.json",
    ]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # Disruptions and a trainer stopped by SIGTERM never count; the trainer's configuration-or-data
    # exit code fails the Job at once.
    disrupted, stopped, bad_input = spec["podFailurePolicy"]["rules"]
    assert disrupted == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert stopped == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_STOPPED]},
    }
    assert bad_input == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_BAD_INPUT]},
    }
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert "activeDeadlineSeconds" not in spec


def test_a_stage_sets_its_grace_period_and_timeout() -> None:
    body = manifest(
        [
            stage(
                "sft",
                "sft",
                inputs={"data": uri("s3://d00")},
                terminationGracePeriodSeconds=900,
                timeoutSeconds=7200,
            )
        ]
    )
    alr = run(body)
    spec = render.build_job(alr, alr.spec.stage("sft"), 1)["spec"]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    assert spec["activeDeadlineSeconds"] == 7200


def test_pod_security_and_volumes() -> None:
    alr = run()
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(job)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/kubealign": "stage-config",
        "/scratch": "scratch",
        "/tmp": "tmp",
        "/dev/shm": "dshm",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["stage-config"]["configMap"]["name"] == "demo-sft-1"
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}
    env = _env(job)
    assert (env["HOME"], env["HF_HOME"]) == ("/scratch", "/scratch/huggingface")


def test_credentials_come_from_the_secret_by_reference_only() -> None:
    alr = run(
        manifest(storage={"uri": STORAGE, "endpoint": "http://s3.local:9000", "secretRef": {"name": "s3"}})
    )
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    env = _env(job)
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "s3"
    assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    assert "AWS_ACCESS_KEY_ID" not in _env(render.build_job(run(), run().spec.stage("sft"), 1))


def test_the_hub_token_comes_from_its_secret_by_reference_and_the_hub_is_not_switched_off() -> None:
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "inputs": {"model": {"uri": "hf://org/model@v1"}, "data": {"uri": "s3://d00/sft"}},
        }
    ]
    for ref, key in (({"name": "hub"}, "token"), ({"name": "hub", "key": "HF"}, "HF")):
        body = manifest(stages, huggingface={"tokenSecretRef": ref})
        assert api.validate(body) == []
        alr = run(body)
        env = _env(render.build_job(alr, alr.spec.stage("sft"), 1))
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": key}}
        assert "HF_HUB_OFFLINE" not in env
    plain = run(manifest(stages))
    assert "HF_TOKEN" not in _env(render.build_job(plain, plain.spec.stage("sft"), 1))


def test_multi_node_stage_is_an_indexed_job_with_a_headless_service() -> None:
    alr = run(
        manifest(
            [stage("sft", "sft", inputs={"data": uri("s3://d00")}, resources={"nodes": 4, "gpusPerNode": 8})]
        )
    )
    sft = alr.spec.stage("sft")
    children = render.build_children(alr, sft, 1)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Job"]
    service, job = children[1], children[2]
    assert service["metadata"]["name"] == "demo-sft-1"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "demo-sft-1"}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["template"]["spec"]["subdomain"] == "demo-sft-1"
    env = _env(job)
    assert env["MASTER_ADDR"] == "demo-sft-1-0.demo-sft-1"
    assert (env["MASTER_PORT"], env["NNODES"], env["NPROC_PER_NODE"]) == ("29500", "4", "8")
    assert env["NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert _container(job)["command"][:6] == [
        "torchrun",
        "--nnodes=$(NNODES)",
        "--node-rank=$(NODE_RANK)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    ]
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    config = json.loads(children[0]["data"]["stage.json"])
    assert config["distributed"] == {"nnodes": 4, "nproc_per_node": 8}


@pytest.mark.parametrize(
    ("resources", "command_head", "nproc"),
    [
        ({}, ["python", "-m"], 1),
        ({"gpusPerNode": 1}, ["python", "-m"], 1),
        ({"gpusPerNode": 4}, ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4"], 4),
        ({"nodes": 2}, ["torchrun", "--nnodes=$(NNODES)"], 1),
    ],
)
def test_command_by_topology(resources: dict[str, int], command_head: list[str], nproc: int) -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")}, resources=resources)]))
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    assert _container(job)["command"][: len(command_head)] == command_head
    assert render.stage_config(alr, alr.spec.stage("sft")).distributed.nproc_per_node == nproc


def test_kueue_queue_label_and_created_suspended() -> None:
    alr = run(manifest(queueName="gpu-queue"))
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_scheduling_and_annotations_are_copied() -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    sft = stage(
        "sft",
        "sft",
        inputs={"data": uri("s3://d00")},
        image="custom:1",
        nodeSelector={"gpu": "a100"},
        tolerations=[toleration],
        podAnnotations={"kubealign.io/kwok-run-seconds": "2", "team": "stage"},
        resources={"cpu": 4, "memory": "16Gi"},
    )
    alr = run(
        manifest(
            [sft],
            podAnnotations={"team": "run", "log": "on"},
            serviceAccountName="trainer",
            priorityClassName="high",
        )
    )
    job = render.build_job(alr, alr.spec.stage("sft"), 1)
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "kubealign.io/kwok-run-seconds": "2",
        "team": "stage",
        "log": "on",
    }
    pod = template["spec"]
    assert (pod["nodeSelector"], pod["tolerations"]) == ({"gpu": "a100"}, [toleration])
    assert (pod["serviceAccountName"], pod["priorityClassName"]) == ("trainer", "high")
    assert _container(job)["image"] == "custom:1"
    assert _container(job)["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"memory": "16Gi"},
    }


def test_single_node_stage_has_no_service() -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")})]))
    assert render.build_service(alr, alr.spec.stage("sft"), 1) is None
    assert [c["kind"] for c in render.build_children(alr, alr.spec.stage("sft"), 1)] == ["ConfigMap", "Job"]


def test_from_inputs_point_at_the_upstream_artifact() -> None:
    alr = run(
        manifest(
            [
                stage("a", "sft", inputs={"data": uri("s3://d00")}),
                stage("b", "dpo", inputs={"model": src("a"), "data": uri("s3://p00")}),
            ]
        )
    )
    assert render.stage_config(alr, alr.spec.stage("b")).inputs.model == f"{STORAGE}/team-a/demo/a/artifact"


@pytest.mark.parametrize(
    ("run_seed", "stage_seed", "expected"),
    [(None, None, 0), (7, None, 7), (7, 3, 3), (None, 0, 0), (2**40, None, 2**40)],
)
def test_the_seed_comes_from_the_stage_else_the_run(
    run_seed: int | None, stage_seed: int | None, expected: int
) -> None:
    body = manifest()
    if run_seed is not None:
        body["spec"]["seed"] = run_seed
    if stage_seed is not None:
        body["spec"]["stages"][4]["seed"] = stage_seed
    assert api.validate(body) == []
    alr = api.AlignmentRun.from_manifest(body)
    assert render.stage_config(alr, alr.spec.stages[4]).seed == expected
    # Other stages keep the run's seed.
    assert render.stage_config(alr, alr.spec.stages[1]).seed == (run_seed or 0)


def test_a_negative_seed_is_refused_naming_the_field() -> None:
    body = manifest()
    body["spec"]["stages"][2]["seed"] = -1
    assert [e.path for e in api.validate(body)] == ["spec.stages[2].seed"]


@pytest.mark.parametrize(
    ("tracking", "config", "secret_env"),
    [
        (None, {"mlflow_uri": None, "experiment": "kubealign", "run_uid": UID}, {}),
        (
            {"mlflow": {"uri": "http://mlflow.mlflow:5000"}},
            {"mlflow_uri": "http://mlflow.mlflow:5000", "experiment": "kubealign", "run_uid": UID},
            {},
        ),
        (
            {"mlflow": {"uri": "https://mlflow.example", "experiment": "rlhf", "secretRef": {"name": "ml"}}},
            {"mlflow_uri": "https://mlflow.example", "experiment": "rlhf", "run_uid": UID},
            {
                key: {"secretKeyRef": {"name": "ml", "key": key, "optional": True}}
                for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
            },
        ),
    ],
)
def test_tracking_reaches_the_stage_config_and_credentials_come_by_reference(
    tracking: dict[str, Any] | None, config: dict[str, Any], secret_env: dict[str, Any]
) -> None:
    body = manifest() if tracking is None else manifest(tracking=tracking)
    assert api.validate(body) == []
    alr = run(body)
    sft = alr.spec.stage("sft")
    assert render.stage_config(alr, sft).to_dict()["tracking"] == config
    env = _env(render.build_job(alr, sft, 3))
    assert {k: v for k, v in env.items() if k.startswith("MLFLOW_")} == secret_env
    # The tracker's tags name the Job and its attempt.
    assert env["KUBEALIGN_JOB"] == render.job_name(alr.name, "sft", 3)
    assert env["KUBEALIGN_ATTEMPT"] == "3"


@pytest.mark.parametrize(
    ("tracking", "field"),
    [
        ({"mlflow": {}}, "spec.tracking.mlflow.uri"),
        ({"mlflow": {"uri": "ftp://x"}}, "spec.tracking.mlflow.uri"),
        ({"mlflow": {"uri": "http://m", "experiment": ""}}, "spec.tracking.mlflow.experiment"),
        (
            {"mlflow": {"uri": "http://m", "secretRef": {"name": "Bad_Name"}}},
            "spec.tracking.mlflow.secretRef.name",
        ),
    ],
)
def test_bad_tracking_is_refused_naming_the_field(tracking: dict[str, Any], field: str) -> None:
    errors = api.validate(manifest(tracking=tracking))
    assert errors and errors[0].path == field, errors


def test_the_judge_servers_key_comes_from_its_secret_by_reference() -> None:
    judge: dict[str, Any] = {
        "endpoint": "http://vllm.judges:8000/v1",
        "model": "judge-70b",
        "secretRef": {"name": "judge"},
    }
    hyperparameters: dict[str, Any] = {"scorer": "vader", "judge": judge}
    stages: list[dict[str, Any]] = [
        {
            "name": "evaluate",
            "type": "evaluate",
            "inputs": {"model": {"uri": "s3://m00/sft"}, "data": {"uri": "s3://d00/prompts"}},
            "hyperparameters": hyperparameters,
        }
    ]
    body = manifest(stages)
    assert api.validate(body) == []
    alr = run(body)
    env = _env(render.build_job(alr, alr.spec.stage("evaluate"), 1))
    assert env["KUBEALIGN_JUDGE_API_KEY"] == {"secretKeyRef": {"name": "judge", "key": "apiKey"}}
    # A judge setting the catalogue refuses is named before anything runs.
    hyperparameters["judge"] = {**judge, "max_concurency": 2}
    (error,) = api.validate(manifest(stages))
    assert (
        "hyperparameters.judge.max_concurency: unknown judge setting; did you mean max_concurrency?"
        in str(error)
    )


def test_an_in_pod_judge_from_a_stage_is_its_artifact_and_an_input_the_stage_waits_for() -> None:
    stages = pipeline()
    stages[-1]["hyperparameters"] = {"judge": {"model": {"from": "pretrain"}, "template": "dialogue"}}
    body = manifest(stages)
    assert api.validate(body) == []
    alr = run(body)
    evaluate = alr.spec.stage("evaluate")
    assert "pretrain" in evaluate.inputs.upstream()
    config = render.stage_config(alr, evaluate)
    judge = config.hyperparameters["judge"]
    assert judge == {
        "model": {"uri": render.stage_artifact(alr, alr.spec.stage("pretrain"))},
        "template": "dialogue",
    }
    # The trainer's own parse accepts what the operator rendered.
    stages_module.parse_hyperparameters("evaluate", config.hyperparameters)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("evaluate", "must name an earlier stage"),
        ("nowhere", "must name an earlier stage"),
        ("generate", "stage 'generate' is a generate stage; a judge needs a model"),
    ],
)
def test_a_judge_from_a_stage_must_be_an_earlier_model(source: str, message: str) -> None:
    stages = pipeline()
    stages[-1]["hyperparameters"] = {"judge": {"model": {"from": source}}}
    (error,) = api.validate(manifest(stages))
    assert error.path == "spec.stages[6].hyperparameters.judge.model.from"
    assert error.message.startswith(message)
