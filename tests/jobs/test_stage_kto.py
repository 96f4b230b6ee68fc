"""The kto stage: labelled rows, the mismatched reference point, training, and the cached reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import data, kto, storage
from tests.jobs.trainer_toys import preference_rows, run_stage, save_tiny_lm, stage_config

HYPER = {
    "max_steps": 8,
    "batch_size": 8,
    "beta": 0.5,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "log_every": 1,
    "checkpoint_every": 0,
    "max_length": 48,
}


def labelled_rows(count: int) -> list[dict[str, Any]]:
    """Each preference pair as two unpaired rows: the chosen answer desirable, the rejected one not."""
    rows = []
    for pair in preference_rows(count):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def row(fields: dict[str, Any]) -> data.Row:
    return data.Row("s3://d00/kto.jsonl", 7, "line", fields)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": "p", "completion": "c"}, "line 7: field 'label': missing"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "line 7: field 'label': expected true or false"),
        ({"prompt": "p", "completion": "c", "label": 1}, "expected true or false, got 1"),
        ({"prompt": "p", "label": True}, "line 7: field 'completion': missing"),
    ],
)
def test_a_bad_row_names_its_line_and_field(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(data.DataError, match=words):
        kto.labelled_example(row(fields))


def test_each_row_gets_another_rows_answer_seeded() -> None:
    partners = kto.mismatched_partners(9, seed=3)
    assert all(j != i for i, j in enumerate(partners))
    assert sorted(partners) == list(range(9))  # every answer is used once as a mismatch
    assert partners == kto.mismatched_partners(9, seed=3)
    assert partners != kto.mismatched_partners(9, seed=4)
    with pytest.raises(data.DataError, match="at least 2 rows"):
        kto.mismatched_partners(1, seed=0)


@pytest.mark.s3
def test_kto_trains_on_unpaired_labels_and_reuses_its_reference(bucket: str, tmp_path: Path) -> None:
    storage.publish_dir(save_tiny_lm(tmp_path / "sft"), f"s3://{bucket}/models/sft")
    rows = labelled_rows(24)
    storage.write_text(f"s3://{bucket}/data/kto.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    inputs = {"model": f"s3://{bucket}/models/sft", "data": f"s3://{bucket}/data/kto.jsonl"}
    output = f"s3://{bucket}/ns/run/kto"
    config = stage_config(tmp_path, stage_type="kto", output=output, inputs=inputs, hyperparameters=HYPER)
    run = run_stage("kto", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = run.steps
    # At the start the policy is the reference: r = 0 and z = 0, so every loss is 1 - sigmoid(0).
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["label_reward"] > 0.0
    assert run.termination is not None
    assert (run.termination["desirable"], run.termination["undesirable"]) == (24.0, 24.0)
    assert run.events("reference_logps")[0]["computed"] == {"train": 48}

    # A retry reuses the cached reference log-probs of the rows and their mismatched answers.
    storage.delete_prefix(f"{output}/artifact")
    again = run_stage("kto", config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.events("reference_logps")[0]["source"].endswith("/reference_logps")
