"""Small builders of AlignmentRun manifests, Jobs and pods, shared by the operator's tests.

The cluster tests import this module too (by path), so a manifest that the unit tests plan for is
the same manifest the real API server and operator see.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubealign import api, render

INVALID_RUNS = Path(__file__).with_name("invalid_runs.yaml")
IMAGE = "registry.example/kubealign-trainer:test"
STORAGE = "s3://kubealign-test/runs"
UID = "0a1b2c3d-0000-4000-8000-000000000001"


def stage(name: str, type: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": type, **fields}


def src(stage_name: str) -> dict[str, str]:
    return {"from": stage_name}


def uri(value: str) -> dict[str, str]:
    return {"uri": value}


def pipeline() -> list[dict[str, Any]]:
    """Every stage type: pretrain -> sft -> generate -> reward -> (dpo | ppo) -> evaluate."""
    return [
        stage("pretrain", "pretrain", inputs={"data": uri("s3://data/corpus")}),
        stage("sft", "sft", inputs={"model": src("pretrain"), "data": uri("s3://data/sft")}),
        stage(
            "generate",
            "generate",
            inputs={"model": src("sft"), "data": uri("s3://data/prompts")},
            hyperparameters={"scorer": "vader"},
        ),
        stage("reward", "reward", inputs={"model": src("sft"), "data": src("generate")}),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": src("generate")}),
        stage(
            "ppo",
            "ppo",
            inputs={"model": src("sft"), "rewardModel": src("reward"), "data": uri("s3://data/prompts")},
        ),
        stage(
            "evaluate",
            "evaluate",
            inputs={
                "policies": [src("dpo"), src("ppo"), {"uri": "s3://models/base", "name": "base"}],
                "reference": src("sft"),
                "rewardModel": src("reward"),
                "data": uri("s3://data/eval"),
            },
        ),
    ]


def manifest(
    stages: list[dict[str, Any]] | None = None,
    *,
    name: str = "demo",
    namespace: str = "team-a",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": 1},
        "spec": {
            "image": IMAGE,
            "storage": {"uri": STORAGE},
            "stages": stages if stages is not None else pipeline(),
        },
    }
    body["spec"].update(spec)
    return body


def run(body: dict[str, Any] | None = None, **kwargs: Any) -> api.AlignmentRun:
    return api.AlignmentRun.from_manifest(body if body is not None else manifest(**kwargs))


def job(
    run_name: str,
    stage_name: str,
    attempt: int = 1,
    *,
    state: str = "active",
    created: str = "2026-01-01T00:00:00Z",
    finished: str = "2026-01-01T00:10:00Z",
    suspend: bool = False,
    queue: str | None = None,
    owner_uid: str = UID,
    message: str = "",
) -> dict[str, Any]:
    """A Job as the API server returns it; state is active, succeeded or failed."""
    labels = {
        render.LABEL_MANAGED_BY: render.MANAGED_BY,
        render.LABEL_RUN: run_name,
        render.LABEL_STAGE: stage_name,
        render.LABEL_ATTEMPT: str(attempt),
    }
    if queue:
        labels[render.LABEL_QUEUE] = queue
    status: dict[str, Any] = {}
    if state == "succeeded":
        status = {
            "completionTime": finished,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": finished}],
        }
    elif state == "failed":
        status = {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": message or "Job has reached the specified backoff limit",
                    "lastTransitionTime": finished,
                }
            ]
        }
    elif not suspend:
        status = {"active": 1, "startTime": created}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": render.job_name(run_name, stage_name, attempt),
            "namespace": "team-a",
            "labels": labels,
            "creationTimestamp": created,
            "ownerReferences": [{"kind": api.KIND, "name": run_name, "uid": owner_uid, "controller": True}],
        },
        "spec": {"suspend": suspend},
        "status": status,
    }


def pod(
    job_name: str,
    *,
    phase: str,
    message: str = "",
    exit_code: int = 0,
    index: int = 0,
    reason: str | None = None,
) -> dict[str, Any]:
    """A finished pod of a Job with the trainer container's termination state."""
    return {
        "metadata": {
            "name": f"{job_name}-{index}-x",
            "labels": {render.JOB_NAME_LABEL: job_name},
            "annotations": {render.COMPLETION_INDEX_ANNOTATION: str(index)},
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": render.CONTAINER_NAME,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                            "message": message,
                        }
                    },
                }
            ],
        },
    }


def invalid_cases() -> list[dict[str, Any]]:
    """The invalid manifests both the API server and api.validate must reject (invalid_runs.yaml)."""
    cases: list[dict[str, Any]] = yaml.safe_load(INVALID_RUNS.read_text(encoding="utf-8"))
    result = []
    for case in cases:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": case.get("name", "bad")},
            "spec": copy.deepcopy(case["spec"]),
        }
        result.append({"id": case["id"], "expect": case["expect"], "manifest": body})
    return result
