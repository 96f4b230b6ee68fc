"""The reward stage end to end through moto S3: pairs (Bradley-Terry) and rankings (Plackett-Luce)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubealign_jobs import storage
from tests.jobs.trainer_toys import preference_rows, ranked_rows, run_stage, save_tiny_lm, stage_config

pytestmark = pytest.mark.s3

HYPER = {
    "max_steps": 20,
    "batch_size": 8,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "log_every": 5,
    "checkpoint_every": 10,
    "max_length": 48,
    "eval_fraction": 0.25,
}


@pytest.mark.parametrize("kind", ["pairs", "rankings"])
def test_reward_model_learns_preferences_and_loads(bucket: str, tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    storage.publish_dir(save_tiny_lm(tmp_path / "sft"), f"s3://{bucket}/models/sft")
    rows = preference_rows(64) if kind == "pairs" else ranked_rows(64)
    storage.write_text(f"s3://{bucket}/data/prefs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    output = f"s3://{bucket}/ns/run/reward"
    inputs = {"model": f"s3://{bucket}/models/sft", "data": f"s3://{bucket}/data/prefs.jsonl"}
    run = run_stage(
        "reward",
        stage_config(tmp_path, stage_type="reward", output=output, inputs=inputs, hyperparameters=HYPER),
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in run.steps] == [5, 10, 15, 20]
    assert run.steps[-1]["loss"] < run.steps[0]["loss"]
    metrics = storage.read_json(f"{output}/metrics.json")
    # A quarter of the prompts is held out, each with all its rows (the toy rows repeat prompts).
    prompts = {r["prompt"] for r in rows}
    held_prompts = max(1, int(len(prompts) * 0.25))
    per_prompt = sorted((sum(r["prompt"] == p for r in rows) for p in prompts), reverse=True)
    assert sum(per_prompt[-held_prompts:]) <= metrics["eval_examples"] <= sum(per_prompt[:held_prompts])
    assert metrics["eval_accuracy"] >= 0.9  # good-vs-bad words: learnable from 48 examples
    assert run.termination is not None and run.termination["eval_accuracy"] == metrics["eval_accuracy"]

    local = storage.fetch_dir(f"{output}/artifact", tmp_path / "artifact")
    scorer = AutoModelForSequenceClassification.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))  # type: ignore[no-untyped-call]
    assert scorer.config.num_labels == 1
    texts = [
        "<|bos|>Review the plot: it was wonderful.<|eos|>",
        "<|bos|>Review the plot: it was awful.<|eos|>",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        good, bad = scorer(**batch).logits.squeeze(-1).tolist()
    assert good > bad  # plain transformers reads the same scores the stage trained


def test_reward_malformed_ranking_is_named(bucket: str, tmp_path: Path) -> None:
    storage.publish_dir(save_tiny_lm(tmp_path / "sft"), f"s3://{bucket}/models/sft")
    storage.write_text(
        f"s3://{bucket}/data/r.jsonl", json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n"
    )
    inputs = {"model": f"s3://{bucket}/models/sft", "data": f"s3://{bucket}/data/r.jsonl"}
    run = run_stage(
        "reward",
        stage_config(
            tmp_path, stage_type="reward", output=f"s3://{bucket}/x", inputs=inputs, hyperparameters=HYPER
        ),
        tmp_path,
    )
    assert run.returncode == 2
    assert "r.jsonl: line 1: field 'responses': expected a list of at least two answers" in run.stderr


def test_the_held_out_split_is_by_prompt_and_seeded() -> None:
    from kubealign_jobs import data, reward

    rows = [data.RankedExample(f"prompt {i // 3}", (f"good {i}", f"bad {i}")) for i in range(60)]
    train, held = reward.split_held_out(rows, fraction=0.25, seed=3)
    assert len(train) + len(held) == 60
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in held})
    assert len({r.prompt for r in held}) == 5  # a quarter of the 20 prompts, all 3 pairs of each
    assert reward.split_held_out(rows, fraction=0.25, seed=3) == (train, held)
    assert reward.split_held_out(rows, fraction=0.25, seed=4)[1] != held
    assert reward.split_held_out(rows, fraction=0.0, seed=3) == (rows, [])
