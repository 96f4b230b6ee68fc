"""MLflow tracking from the trainer, against a real `mlflow server` on 127.0.0.1 (tests/conftest.py).

A stage's child run holds its params, per-step metrics and final metrics under one parent run per
AlignmentRun; a killed and resumed stage keeps one child run; a tracker that is down fails nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import storage, tracking
from kubealign_jobs.config import StageConfig, Tracking
from tests.conftest import MlflowServer
from tests.jobs.trainer_toys import (
    run_stage,
    run_until_checkpoint,
    save_tiny_lm,
    sft_rows,
    stage_config,
    write_jsonl,
)

HYPER = {
    "max_steps": 6,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "log_every": 1,
    "checkpoint_every": 2,
    "keep_checkpoints": 5,
    "max_length": 48,
    "lora": {"r": 4, "alpha": 8},
}


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tracking-inputs")
    model = save_tiny_lm(root / "model")
    return {
        "model": str(model),
        "data": str(write_jsonl(root / "sft.jsonl", sft_rows(40))),
        "eval_data": str(write_jsonl(root / "eval.jsonl", sft_rows(8, seed=9))),
    }


def tracked_config(folder: Path, inputs: dict[str, str], uri: str, uid: str, **hyper: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return stage_config(
        folder,
        stage_type="sft",
        output=str(folder / "out"),
        inputs=inputs,
        hyperparameters={**HYPER, **hyper},
        tracking={"mlflow_uri": uri, "experiment": "tracking-tests", "run_uid": uid},
    )


def runs_of(server: MlflowServer, uid: str, kind: str) -> list[Any]:
    client = server.client()
    experiment = client.get_experiment_by_name("tracking-tests")
    query = f"tags.`kubealign.run_uid` = '{uid}' and tags.`kubealign.kind` = '{kind}'"
    return list(client.search_runs([experiment.experiment_id], filter_string=query))


def tracker_of(server: MlflowServer, uid: str, run: str, stage: str) -> tracking.MlflowTracker:
    """The tracker a stage's rank 0 starts, for stage ``stage`` of run ``run`` (uid ``uid``)."""
    config = StageConfig.from_dict(
        {
            "run": run,
            "stage": stage,
            "type": "sft",
            "output": f"/unused/{stage}",
            "hyperparameters": {"max_steps": 1},
            "tracking": {"mlflow_uri": server.uri, "experiment": "tracking-tests", "run_uid": uid},
        }
    )
    tracker = tracking.start(config, is_main=True)
    assert tracker is not None
    return tracker


def history(server: MlflowServer, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in server.client().get_metric_history(run_id, key)}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"step": 3, "total_steps": 9, "loss": 1.5, "lr": 1e-3, "epoch": 0.5},
            (3, {"loss": 1.5, "lr": 1e-3, "epoch": 0.5}),
        ),
        ({"event": "eval", "step": 4, "eval_loss": 2.0}, (4, {"eval/eval_loss": 2.0})),
        ({"event": "checkpoint", "step": 4, "uri": "s3://b/c"}, None),
        ({"step": 2, "policy": "sft", "done": True}, None),  # no numbers (a bool is not one)
        ({"step": True, "loss": 1.0}, None),
        ({"loss": 1.0}, None),
    ],
)
def test_which_records_become_metrics(record: dict[str, Any], expected: Any) -> None:
    assert tracking.record_metrics(record) == expected


def test_params_flatten_hyperparameters_with_seed_and_inputs() -> None:
    config = StageConfig.from_dict(
        {
            "run": "r",
            "stage": "s",
            "type": "dpo",
            "output": "/o",
            "seed": 7,
            "inputs": {"model": "s3://b/m", "policies": {"a": "s3://b/a"}},
            "hyperparameters": {"beta": 0.1, "lora": {"r": 8, "target_modules": ["q_proj"]}},
            "tracking": {"mlflow_uri": "http://127.0.0.1:1", "run_uid": "u"},
        }
    )
    assert tracking.stage_params(config) == {
        "beta": "0.1",
        "lora.r": "8",
        "lora.target_modules": "['q_proj']",
        "seed": "7",
        "input.model": "s3://b/m",
        "input.policies.a": "s3://b/a",
    }
    assert config.tracking == Tracking(mlflow_uri="http://127.0.0.1:1", run_uid="u")


def test_a_stage_logs_params_step_metrics_and_final_metrics_under_its_runs_parent(
    mlflow_server: MlflowServer, sft_inputs: dict[str, str], tmp_path: Path
) -> None:
    config = tracked_config(tmp_path / "a", sft_inputs, mlflow_server.uri, "uid-a")
    run = run_stage("sft", config, tmp_path, env={"KUBEALIGN_JOB": "toy-sft-toy-0", "KUBEALIGN_ATTEMPT": "0"})
    assert run.returncode == 0, run.stderr[-3000:]

    (parent,) = runs_of(mlflow_server, "uid-a", "run")
    (child,) = runs_of(mlflow_server, "uid-a", "stage")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == "sft-toy" and parent.info.run_name == "toy"
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    # The run spans the stage, not just the time since the tracker came up in the background.
    (done,) = run.events("done")
    assert child.info.end_time - child.info.start_time >= done["elapsed_s"] * 1000
    assert child.data.tags["kubealign.job"] == "toy-sft-toy-0"
    assert child.data.tags["kubealign.attempt"] == "0"
    assert child.data.tags["kubealign.artifact"] == str(tmp_path / "a" / "out" / "artifact")
    assert child.data.params["learning_rate"] == "0.01" and child.data.params["lora.r"] == "4"
    assert child.data.params["input.model"] == sft_inputs["model"]
    # Every progress record at its step, with the values the stage printed.
    loss = history(mlflow_server, child.info.run_id, "loss")
    assert loss == {r["step"]: pytest.approx(r["loss"]) for r in run.steps}
    for key in ("lr", "tokens_per_s", "steps_per_s"):
        assert sorted(history(mlflow_server, child.info.run_id, key)) == list(range(1, 7)), key
    final = run.termination or {}
    assert child.data.metrics["eval_loss"] == pytest.approx(final["eval_loss"])
    assert child.data.metrics["train_loss"] == pytest.approx(final["train_loss"])


def test_a_killed_and_resumed_stage_keeps_one_mlflow_run(
    mlflow_server: MlflowServer, sft_inputs: dict[str, str], tmp_path: Path
) -> None:
    # Enough steps that the stage is still training once its MLflow run exists (the tracker starts
    # in the background, a few seconds in); it is killed at the first checkpoint after that.
    config = tracked_config(tmp_path / "k", sft_inputs, mlflow_server.uri, "uid-k", max_steps=400)

    def logging_to_mlflow() -> bool:
        found = runs_of(mlflow_server, "uid-k", "stage")
        return bool(found) and bool(history(mlflow_server, found[0].info.run_id, "loss"))

    run_until_checkpoint("sft", tmp_path / "k", config, 2, ready=logging_to_mlflow)
    (child,) = runs_of(mlflow_server, "uid-k", "stage")
    assert child.info.status == "RUNNING"  # SIGKILL: nobody ended it

    resumed = run_stage("sft", config, tmp_path / "k", env={"KUBEALIGN_ATTEMPT": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = resumed.events("resumed")[0]["step"]
    assert 2 <= resumed_at < 400
    (again,) = runs_of(mlflow_server, "uid-k", "stage")
    assert again.info.run_id == child.info.run_id
    assert again.info.status == "FINISHED" and again.data.tags["kubealign.attempt"] == "1"
    assert len(runs_of(mlflow_server, "uid-k", "run")) == 1
    loss = history(mlflow_server, child.info.run_id, "loss")
    assert set(range(resumed_at + 1, 401)) <= set(loss) and min(loss) <= resumed_at
    assert loss[400] == pytest.approx(resumed.steps[-1]["loss"])


def test_stages_starting_together_share_one_parent(mlflow_server: MlflowServer) -> None:
    gate = threading.Barrier(3)
    trackers: list[tracking.MlflowTracker] = []

    def begin(stage: str) -> None:
        gate.wait()
        trackers.append(tracker_of(mlflow_server, "uid-t", "together", stage))

    threads = [threading.Thread(target=begin, args=(f"s{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for step, tracker in enumerate(trackers, start=1):
        tracker.log_record({"step": step, "loss": float(step)})
    for tracker in trackers:
        tracker.finish("FINISHED")
    (parent,) = runs_of(mlflow_server, "uid-t", "run")
    children = runs_of(mlflow_server, "uid-t", "stage")
    assert sorted(c.info.run_name for c in children) == ["s0", "s1", "s2"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}


def test_a_tracker_that_is_down_fails_nothing_and_waits_little(
    sft_inputs: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: every call is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "u").mkdir()
    untracked = stage_config(
        tmp_path / "u",
        stage_type="sft",
        output=str(tmp_path / "u" / "out"),
        inputs=sft_inputs,
        hyperparameters=HYPER,
    )
    started = time.monotonic()
    baseline = run_stage("sft", untracked, tmp_path / "u")
    plain = time.monotonic() - started
    assert baseline.returncode == 0, baseline.stderr[-3000:]

    config = tracked_config(tmp_path / "d", sft_inputs, f"http://127.0.0.1:{port}", "uid-d")
    started = time.monotonic()
    run = run_stage("sft", config, tmp_path / "d")
    tracked = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert storage.is_complete(str(tmp_path / "d" / "out" / "artifact"))
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line and "tracking:" in line]
    # One warning for the outage, one for what could not be sent at the end: not one per call.
    assert 1 <= len(warnings) <= 2, warnings
    assert "the stage goes on" in warnings[0]
    # The end waits a few seconds for an unreachable tracker, not MLflow's minutes of retries.
    assert tracked < plain + tracking.UNREACHABLE_FLUSH_SECONDS + 20, (plain, tracked)


def test_a_replayed_step_is_logged_once_and_the_parent_follows_every_child(
    mlflow_server: MlflowServer,
) -> None:
    def attempt(stage: str) -> tracking.MlflowTracker:
        return tracker_of(mlflow_server, "uid-r", "replay", stage)

    def parent_status() -> str:
        (parent,) = runs_of(mlflow_server, "uid-r", "run")
        return str(parent.info.status)

    # Attempt 1 logs steps 1-10 and is stopped (its last checkpoint was step 6); attempt 2 resumes
    # at 6 and replays 7-10 before going on to 12.
    first = attempt("a")
    for step in range(1, 11):
        first.log_record({"step": step, "loss": float(step)})
    first.finish("KILLED")
    assert parent_status() == "RUNNING"
    second = attempt("a")
    for step in range(7, 13):
        second.log_record({"step": step, "loss": float(step) + 0.5})
    second.finish("FINISHED", step=12, metrics={"train_loss": 12.5})
    (child,) = runs_of(mlflow_server, "uid-r", "stage")
    steps = [m.step for m in mlflow_server.client().get_metric_history(child.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 13))
    loss = history(mlflow_server, child.info.run_id, "loss")
    assert loss[10] == 10.0 and loss[11] == 11.5
    assert history(mlflow_server, child.info.run_id, "train_loss") == {12: 12.5}
    assert parent_status() == "FINISHED"

    # A failed stage keeps the parent FAILED when another finishes after it, until its retry succeeds.
    attempt("b").finish("FAILED")
    assert parent_status() == "FAILED"
    attempt("c").finish("FINISHED")
    assert parent_status() == "FAILED"
    attempt("b").finish("FINISHED")
    assert parent_status() == "FINISHED"
