"""The sft stage end to end through the moto S3 server: trains, publishes, resumes, fails clearly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubealign_jobs import checkpoint, storage
from kubealign_jobs.config import EXIT_STOPPED, MANIFEST_FILE
from tests.jobs.trainer_toys import (
    parse_records,
    preference_rows,
    run_stage,
    save_tiny_lm,
    sft_rows,
    stage_config,
    stage_env,
    write_jsonl,
)

pytestmark = pytest.mark.s3

HYPER = {
    "max_steps": 12,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "log_every": 1,
    "checkpoint_every": 4,
    "max_length": 48,
}


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "model")


def _inputs(bucket: str, tiny_lm_dir: Path, tmp_path: Path, rows: list[dict[str, object]]) -> dict[str, str]:
    storage.publish_dir(tiny_lm_dir, f"s3://{bucket}/models/tiny")
    write_jsonl(tmp_path / "sft.jsonl", rows)
    storage.write_text(f"s3://{bucket}/data/sft.jsonl", (tmp_path / "sft.jsonl").read_text())
    storage.write_text(
        f"s3://{bucket}/data/eval.jsonl", "".join(json.dumps(r) + "\n" for r in sft_rows(8, seed=9))
    )
    return {
        "model": f"s3://{bucket}/models/tiny",
        "data": f"s3://{bucket}/data/sft.jsonl",
        "eval_data": f"s3://{bucket}/data/eval.jsonl",
    }


def test_sft_trains_publishes_and_loads_with_transformers(
    bucket: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = f"s3://{bucket}/ns/run/sft"
    config = stage_config(
        tmp_path,
        stage_type="sft",
        output=output,
        inputs=_inputs(bucket, tiny_lm_dir, tmp_path, sft_rows(40)),
        hyperparameters=HYPER,
    )
    run = run_stage("sft", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [r["loss"] for r in run.steps]
    assert [r["step"] for r in run.steps] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 for r in run.steps)
    assert losses[-1] < losses[0] * 0.8  # the completions are learnable: the loss must fall
    assert [e["step"] for e in run.events("checkpoint")] == [4, 8, 12]
    assert run.termination is not None and run.termination["status"] == "succeeded"
    assert run.termination["eval_loss"] == pytest.approx(run.events("eval")[-1]["eval_loss"])
    assert storage.read_json(f"{output}/metrics.json")["steps"] == 12
    assert storage.is_complete(f"{output}/artifact")
    assert [s for s, _ in checkpoint.list_checkpoints(f"{output}/checkpoints")] == [8, 12]  # keep 2

    local = storage.fetch_dir(f"{output}/artifact", tmp_path / "artifact")
    lm = AutoModelForCausalLM.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))  # type: ignore[no-untyped-call]
    ids = tokenizer("Review the plot:", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert lm(ids).logits.shape[-1] == len(tokenizer)

    again = run_stage("sft", config, tmp_path)  # a retried pod finds the artifact and stops at once
    assert again.returncode == 0 and again.events("already_complete") and not again.steps
    assert again.termination is not None and again.termination["already_complete"] is True


def test_preferred_ft_trains_on_chosen_answers(bucket: str, tiny_lm_dir: Path, tmp_path: Path) -> None:
    inputs = _inputs(bucket, tiny_lm_dir, tmp_path, preference_rows(16))
    del inputs["eval_data"]
    config = stage_config(
        tmp_path,
        stage_type="sft",
        output=f"s3://{bucket}/ns/run/pft",
        inputs=inputs,
        hyperparameters={**HYPER, "max_steps": 3, "preferred_ft": True},
    )
    run = run_stage("sft", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.steps) == 3


def test_malformed_row_fails_with_file_line_field(bucket: str, tiny_lm_dir: Path, tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [*sft_rows(5), {"prompt": "x", "completion": 7}]
    config = stage_config(
        tmp_path,
        stage_type="sft",
        output=f"s3://{bucket}/ns/run/bad",
        inputs=_inputs(bucket, tiny_lm_dir, tmp_path, rows),
        hyperparameters=HYPER,
    )
    run = run_stage("sft", config, tmp_path)
    assert run.returncode == 2
    expected = f"s3://{bucket}/data/sft.jsonl: line 6: field 'completion': expected a string, got int"
    assert expected in run.stderr
    assert run.termination is not None and expected in run.termination["error"]
    assert not storage.list_files(f"s3://{bucket}/ns/run/bad/artifact")


def test_unknown_hyperparameter_is_named(bucket: str, tmp_path: Path) -> None:
    config = stage_config(
        tmp_path,
        stage_type="sft",
        output=f"s3://{bucket}/x",
        inputs={},
        hyperparameters={"learning_rat": 1e-3},
    )
    run = run_stage("sft", config, tmp_path)
    assert run.returncode == 2
    assert "hyperparameters.learning_rat: unknown hyperparameter" in run.stderr


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_without_reseeing_data(
    bucket: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    inputs = _inputs(bucket, tiny_lm_dir, tmp_path, sft_rows(40))
    hyper = {**HYPER, "max_steps": 40, "checkpoint_every": 5, "keep_checkpoints": 10}
    reference = run_stage(
        "sft",
        stage_config(
            tmp_path, stage_type="sft", output=f"s3://{bucket}/ref", inputs=inputs, hyperparameters=hyper
        ),
        tmp_path,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    output = f"s3://{bucket}/killed"
    config = stage_config(tmp_path, stage_type="sft", output=output, inputs=inputs, hyperparameters=hyper)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubealign_jobs.sft", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=stage_env(tmp_path),
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if '"event": "checkpoint"' in line and json.loads(line)["step"] == 10:
            proc.send_signal(signal.SIGKILL)  # a preemption: no cleanup, no final artifact
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    first = parse_records("".join(seen))
    assert not storage.is_complete(f"{output}/artifact")

    resumed = run_stage("sft", config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] >= 10
    start = resumed.events("resumed")[0]["step"]
    assert [r["step"] for r in resumed.steps] == list(range(start + 1, 41))  # the count continues
    # Same batches in the same order as the uninterrupted run, so the same losses: had the
    # resumed run re-drawn examples already seen, or restarted its data order, these would differ.
    expected = {r["step"]: r["loss"] for r in reference.steps}
    for record in [*(r for r in first if "event" not in r), *resumed.steps]:
        assert record["loss"] == pytest.approx(expected[record["step"]], rel=1e-4, abs=1e-5), record["step"]
    final = checkpoint.latest_checkpoint(f"{output}/checkpoints", tmp_path / "ck")
    reference_final = checkpoint.latest_checkpoint(f"s3://{bucket}/ref/checkpoints", tmp_path / "ck2")
    assert final is not None and reference_final is not None
    assert final.state["data_position"] == reference_final.state["data_position"] == {"epoch": 3, "index": 40}
    assert MANIFEST_FILE in [p for p, _ in storage.list_files(f"{output}/artifact")]


def test_sigterm_publishes_a_checkpoint_of_the_current_step_and_resume_loses_nothing(
    bucket: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    """What a Kueue preemption or a node drain does to a trainer pod: SIGTERM, then SIGKILL after
    the grace period. The trainer finishes the step in flight, checkpoints it (although the
    interval checkpoint is far away), exits 143, and the next pod continues from that step."""
    inputs = _inputs(bucket, tiny_lm_dir, tmp_path, sft_rows(40))
    hyper = {**HYPER, "max_steps": 40, "checkpoint_every": 25}
    output = f"s3://{bucket}/signalled"
    config = stage_config(tmp_path, stage_type="sft", output=output, inputs=inputs, hyperparameters=hyper)
    termination = tmp_path / "termination-log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubealign_jobs.sft", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**stage_env(tmp_path), "KUBEALIGN_TERMINATION_LOG": str(termination)},
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        record = json.loads(line) if line.startswith("{") else {}
        if "event" not in record and record.get("step") == 7:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    records = parse_records("".join(seen))
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert proc.returncode == EXIT_STOPPED, "".join(seen)[-2000:]
    (event,) = stopped
    # The signal lands during step 8 at the latest: that step completes and is checkpointed.
    assert 7 <= event["step"] <= 9
    assert json.loads(termination.read_text()) == {
        "status": "stopped",
        "stage": "sft-toy",
        "step": event["step"],
    }
    latest = checkpoint.latest_checkpoint(f"{output}/checkpoints", tmp_path / "ck")
    assert latest is not None and latest.step == event["step"]
    assert not storage.is_complete(f"{output}/artifact")

    resumed = run_stage("sft", config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] == event["step"]  # not the last interval checkpoint
    assert [r["step"] for r in resumed.steps] == list(range(event["step"] + 1, 41))


def test_packed_batches_follow_the_padded_loss_trajectory(
    bucket: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    """packing changes how a micro-batch is laid out, never what it computes."""
    inputs = _inputs(bucket, tiny_lm_dir, tmp_path, sft_rows(24))
    losses = {}
    for packing in (False, True):
        config = stage_config(
            tmp_path,
            stage_type="sft",
            output=f"s3://{bucket}/ns/run/sft-packing-{packing}",
            inputs=inputs,
            hyperparameters={**HYPER, "max_steps": 5, "checkpoint_every": 0, "packing": packing},
        )
        run = run_stage("sft", config, tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[packing] = [r["loss"] for r in run.steps]
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] < losses[True][0]
