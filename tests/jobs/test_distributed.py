"""Two gloo processes under torchrun train exactly like one: same loss trajectory, one writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import checkpoint, storage
from tests.jobs.trainer_toys import (
    TINY_LLAMA,
    preference_rows,
    run_stage,
    save_tiny_lm,
    sentences,
    stage_config,
)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _setup(stage_type: str, bucket: str, tmp_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    common = {"max_steps": 6, "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "warmup_steps": 0}
    if stage_type == "dpo":
        storage.publish_dir(save_tiny_lm(tmp_path / "sft"), f"s3://{bucket}/models/sft")
        rows = "".join(json.dumps(r) + "\n" for r in preference_rows(24))
        storage.write_text(f"s3://{bucket}/data/prefs.jsonl", rows)
        storage.write_text(f"s3://{bucket}/data/eval.jsonl", rows)
        inputs = {
            "model": f"s3://{bucket}/models/sft",
            "data": f"s3://{bucket}/data/prefs.jsonl",
            "eval_data": f"s3://{bucket}/data/eval.jsonl",
        }
        return inputs, {**common, "beta": 0.5, "learning_rate": 5e-3, "max_length": 48}
    storage.write_text(f"s3://{bucket}/corpus.txt", "\n".join(sentences(200)) + "\n")
    hyper = {**common, "learning_rate": 1e-2, "block_size": 32, "vocab_size": 300, "model": TINY_LLAMA}
    return {"data": f"s3://{bucket}/corpus.txt"}, hyper


@pytest.mark.parametrize("stage_type", ["dpo", "pretrain"])
def test_two_processes_match_one(stage_type: str, bucket: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    inputs, hyper = _setup(stage_type, bucket, tmp_path)
    runs = {}
    for processes in (1, 2):
        output = f"s3://{bucket}/ns/run/{stage_type}-{processes}"
        config = stage_config(
            tmp_path,
            stage_type=stage_type,
            output=output,
            inputs=inputs,
            hyperparameters=hyper,
            distributed={"nnodes": 1, "nproc_per_node": processes},
        )
        run = run_stage(stage_type, config, tmp_path, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        runs[processes] = run
        assert storage.is_complete(f"{output}/artifact")
        AutoModelForCausalLM.from_pretrained(
            str(storage.fetch_dir(f"{output}/artifact", tmp_path / f"a{processes}"))
        )
        found = checkpoint.latest_checkpoint(f"{output}/checkpoints", tmp_path / f"ck{processes}")
        assert found is not None and found.step == 6
        assert len(found.state["rng"]) == processes  # every rank's RNG state is kept

    assert "launching 1 x 2 processes" in runs[2].stderr
    one, two = runs[1].steps, runs[2].steps
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), a["step"]
    assert one[-1]["loss"] < one[0]["loss"]
    # Rank 0 alone reports: one record per step, one checkpoint event per checkpoint.
    assert [e["step"] for e in runs[2].events("checkpoint")] == [3, 6]
    assert runs[2].termination is not None and runs[2].termination["status"] == "succeeded"
    if stage_type == "dpo":
        assert runs[2].termination["eval_loss"] == pytest.approx(runs[1].termination["eval_loss"], rel=1e-4)  # type: ignore[index]


def test_two_processes_resume_from_one_node_copy(bucket: str, tmp_path: Path) -> None:
    inputs, hyper = _setup("dpo", bucket, tmp_path)
    output = f"s3://{bucket}/ns/run/dpo-resume"

    def run(max_steps: int) -> Any:
        config = stage_config(
            tmp_path,
            stage_type="dpo",
            output=output,
            inputs=inputs,
            hyperparameters={**hyper, "max_steps": max_steps},
            distributed={"nnodes": 1, "nproc_per_node": 2},
        )
        return run_stage("dpo", config, tmp_path, timeout=600)

    first = run(3)
    assert first.returncode == 0, first.stderr[-4000:]
    storage.delete_prefix(f"{output}/artifact")
    resumed = run(5)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.events("resumed")[0]["step"] == 3
    assert [r["step"] for r in resumed.steps] == [4, 5]
    assert resumed.events("reference_logps")[0]["source"] == f"{output}/reference_logps"
