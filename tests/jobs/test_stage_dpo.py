"""The dpo stage end to end through the moto S3 server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kubealign_jobs import checkpoint, storage
from tests.jobs.trainer_toys import TINY_GPT2, preference_rows, run_stage, save_tiny_lm, stage_config

pytestmark = pytest.mark.s3

HYPER = {
    "max_steps": 6,
    "batch_size": 8,
    "beta": 0.5,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "log_every": 1,
    "checkpoint_every": 2,
    "keep_checkpoints": 3,
    "max_length": 48,
}


def _upload(bucket: str, model_dir: Path) -> dict[str, str]:
    storage.publish_dir(model_dir, f"s3://{bucket}/models/sft")
    rows = "".join(json.dumps(r) + "\n" for r in preference_rows(32))
    storage.write_text(f"s3://{bucket}/data/prefs.jsonl", rows)
    storage.write_text(
        f"s3://{bucket}/data/eval.jsonl", "".join(json.dumps(r) + "\n" for r in preference_rows(8, seed=5))
    )
    return {
        "model": f"s3://{bucket}/models/sft",
        "data": f"s3://{bucket}/data/prefs.jsonl",
        "eval_data": f"s3://{bucket}/data/eval.jsonl",
    }


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dpo_trains_stores_reference_logps_and_resumes(bucket: str, tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_lm(tmp_path / "sft", spec=TINY_GPT2 if arch == "gpt2" else None)
    inputs = _upload(bucket, model_dir)
    output = f"s3://{bucket}/ns/run/dpo"
    config = stage_config(tmp_path, stage_type="dpo", output=output, inputs=inputs, hyperparameters=HYPER)
    run = run_stage("dpo", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    assert run.events("reference_logps")[0]["computed"] == {"train": 32, "eval": 8}
    assert storage.is_complete(f"{output}/reference_logps")
    steps = run.steps
    # The policy starts as the reference: every pair's loss is exactly -log sigmoid(0).
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["reward_accuracy"] > 0.5 and steps[-1]["reward_margin"] > 0
    for name in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_chosen_reward"):
        assert name in run.termination  # type: ignore[operator]
    lm = AutoModelForCausalLM.from_pretrained(str(storage.fetch_dir(f"{output}/artifact", tmp_path / "out")))
    assert lm.config.model_type == arch

    # A retry after a lost artifact and a damaged newest checkpoint: resume from the previous
    # good checkpoint, reuse the stored reference log-probs, continue the step count.
    storage.delete_prefix(f"{output}/artifact")
    newest = checkpoint.step_uri(f"{output}/checkpoints", 6)
    state_uri = f"{newest}/{checkpoint.STATE_FILE}"
    storage.write_bytes(state_uri, storage.read_bytes(state_uri)[:-10] + b"0123456789")
    longer = stage_config(
        tmp_path, stage_type="dpo", output=output, inputs=inputs, hyperparameters={**HYPER, "max_steps": 8}
    )
    retry = run_stage("dpo", longer, tmp_path)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "ignoring checkpoint at step 6" in retry.stderr
    assert retry.events("resumed")[0]["step"] == 4
    assert [r["step"] for r in retry.steps] == [5, 6, 7, 8]
    assert retry.events("reference_logps")[0]["source"] == f"{output}/reference_logps"
    # Steps 5 and 6 replay the first run exactly (same weights, optimizer state and batches).
    first = {r["step"]: r["loss"] for r in steps}
    for record in retry.steps[:2]:
        assert record["loss"] == pytest.approx(first[record["step"]], rel=1e-4)


def test_reference_logps_recomputed_for_other_data(bucket: str, tmp_path: Path) -> None:
    inputs = _upload(bucket, save_tiny_lm(tmp_path / "sft"))
    del inputs["eval_data"]
    output = f"s3://{bucket}/ns/run/dpo2"
    hyper = {**HYPER, "max_steps": 1, "checkpoint_every": 0}
    assert (
        run_stage(
            "dpo",
            stage_config(tmp_path, stage_type="dpo", output=output, inputs=inputs, hyperparameters=hyper),
            tmp_path,
        ).returncode
        == 0
    )
    stored = storage.fetch_dir(f"{output}/reference_logps", tmp_path / "ref")
    logps = torch.load(stored / "logps.pt", weights_only=True)["train"]
    assert logps.shape == (32, 2) and bool((logps < 0).all())

    storage.delete_prefix(f"{output}/artifact")
    storage.write_text(inputs["data"], "".join(json.dumps(r) + "\n" for r in preference_rows(16, seed=3)))
    retry = run_stage(
        "dpo",
        stage_config(tmp_path, stage_type="dpo", output=output, inputs=inputs, hyperparameters=hyper),
        tmp_path,
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert retry.events("reference_logps")[0]["computed"] == {"train": 16}
    assert "are for other data or weights; recomputing" in retry.stderr


def test_dpo_malformed_pair_is_named(bucket: str, tmp_path: Path) -> None:
    inputs = _upload(bucket, save_tiny_lm(tmp_path / "sft"))
    storage.write_text(
        inputs["data"], json.dumps(preference_rows(1)[0]) + "\n" + '{"prompt": "x", "chosen": "y"}\n'
    )
    run = run_stage(
        "dpo",
        stage_config(
            tmp_path, stage_type="dpo", output=f"s3://{bucket}/bad", inputs=inputs, hyperparameters=HYPER
        ),
        tmp_path,
    )
    assert run.returncode == 2
    assert f"{inputs['data']}: line 2: field 'rejected': missing" in run.stderr


def test_the_reference_cache_is_keyed_by_precision_and_device(tmp_path: Path) -> None:
    """Log-probs computed in bf16 or on a GPU are not reused by an fp32 CPU run, nor the reverse."""
    from kubealign_jobs import data, dpo

    pairs = [data.EncodedRanking(sequences=(data.Encoded((1, 5, 6), 1), data.Encoded((1, 5, 7), 1)))]
    uri = f"file://{tmp_path}/reference"
    base = dpo.fingerprint(uri, pairs, split="train", precision="no", device="cpu")
    assert base == dpo.fingerprint(uri, pairs, split="train", precision="no", device="cpu")
    assert base != dpo.fingerprint(uri, pairs, split="train", precision="bf16", device="cpu")
    assert base != dpo.fingerprint(uri, pairs, split="train", precision="no", device="cuda")
    assert base != dpo.fingerprint(uri, pairs, split="eval", precision="no", device="cpu")


@pytest.mark.parametrize(
    ("loss_type", "extra", "first_loss"),
    [
        # At the start the policy is the reference (or, for simpo, chosen and rejected are alike
        # only on average), so the first loss is each formula at a zero log-ratio gap.
        ("ipo", {}, 1.0),  # (0 - 1/(2 * 0.5))^2
        ("robust", {"label_smoothing": 0.2}, math.log(2)),
        ("simpo", {"gamma": 0.5}, None),
    ],
)
def test_other_loss_types_train_and_simpo_loads_no_reference(
    bucket: str, tmp_path: Path, loss_type: str, extra: dict[str, float], first_loss: float | None
) -> None:
    inputs = _upload(bucket, save_tiny_lm(tmp_path / "sft"))
    output = f"s3://{bucket}/ns/run/{loss_type}"
    hyperparameters = {**HYPER, "checkpoint_every": 0, "loss_type": loss_type, **extra}
    config = stage_config(
        tmp_path, stage_type="dpo", output=output, inputs=inputs, hyperparameters=hyperparameters
    )
    run = run_stage("dpo", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = run.steps
    if first_loss is not None:
        assert steps[0]["loss"] == pytest.approx(first_loss, abs=1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert run.termination is not None and run.termination["loss_type"] == loss_type
    # Only the reference-based losses compute and cache reference log-probs.
    assert bool(run.events("reference_logps")) is (loss_type != "simpo")
    assert storage.is_complete(f"{output}/reference_logps") is (loss_type != "simpo")


def test_simpo_with_a_reference_and_smoothing_with_ipo_are_refused(bucket: str, tmp_path: Path) -> None:
    inputs = _upload(bucket, save_tiny_lm(tmp_path / "sft"))
    for hyperparameters, inputs_extra, field in (
        ({"loss_type": "simpo"}, {"reference": inputs["model"]}, "inputs.reference"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, {}, "hyperparameters.label_smoothing"),
    ):
        config = stage_config(
            tmp_path,
            stage_type="dpo",
            output=f"s3://{bucket}/ns/run/bad",
            inputs={**inputs, **inputs_extra},
            hyperparameters={**HYPER, **hyperparameters},
        )
        run = run_stage("dpo", config, tmp_path)
        assert run.returncode == 2, run.stderr[-2000:]
        assert field in run.stderr
