"""The generate stage: labelled samples -> preference rows, end to end through S3, resumable by chunk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import data, generate, storage
from kubealign_jobs.generate import LabelledPrompt, preference_rows
from tests.jobs.rlhf_toys import PROMPTS, read_jsonl, save_toy_policy, write_jsonl
from tests.jobs.trainer_toys import run_stage, stage_config


def _labelled(completions: list[str], scores: list[float]) -> LabelledPrompt:
    return LabelledPrompt(index=0, prompt="the movie", completions=completions, scores=scores)


def test_best_worst_pairs_highest_with_lowest_and_keeps_scores() -> None:
    rows = preference_rows(
        _labelled(["ok", "great", "bad", "fine"], [0.1, 0.9, -0.7, 0.3]),
        output_format="best_worst",
        min_margin=0.0,
    )
    assert rows == [
        {
            "prompt": "the movie",
            "chosen": "great",
            "rejected": "bad",
            "chosen_score": 0.9,
            "rejected_score": -0.7,
        }
    ]


def test_all_pairs_skips_ties_and_pairs_within_the_margin() -> None:
    labelled = _labelled(["a", "b", "c", "d"], [1.0, 0.5, 0.5, 0.45])
    rows = preference_rows(labelled, output_format="all_pairs", min_margin=0.0)
    pairs = {(row["chosen"], row["rejected"]) for row in rows}
    # b and c tie: no preference between them; every other pair is ordered by score.
    assert pairs == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}
    assert all(row["chosen_score"] > row["rejected_score"] for row in rows)
    wide = preference_rows(labelled, output_format="all_pairs", min_margin=0.1)
    assert {(row["chosen"], row["rejected"]) for row in wide} == {("a", "b"), ("a", "c"), ("a", "d")}


def test_ranking_is_best_first_without_empty_or_duplicate_answers() -> None:
    labelled = _labelled(["fine", "", "great", "fine", "  ", "bad"], [0.2, 0.9, 0.8, 0.2, 0.95, -0.5])
    [row] = preference_rows(labelled, output_format="ranking", min_margin=0.0)
    assert row == {"prompt": "the movie", "responses": ["great", "fine", "bad"], "scores": [0.8, 0.2, -0.5]}


@pytest.mark.parametrize("output_format", ["best_worst", "all_pairs", "ranking"])
def test_no_row_when_fewer_than_two_distinct_answers(output_format: str) -> None:
    assert (
        preference_rows(
            _labelled(["same", "same", ""], [0.3, 0.3, 1.0]), output_format=output_format, min_margin=0
        )
        == []
    )


def test_rows_are_what_the_trainers_parse(tmp_path: Path) -> None:
    labelled = _labelled(["ok", "great", "bad"], [0.1, 0.9, -0.7])
    pairs = write_jsonl(
        tmp_path / "p" / "preferences.jsonl",
        preference_rows(labelled, output_format="all_pairs", min_margin=0),
    )
    ranks = write_jsonl(
        tmp_path / "r" / "rankings.jsonl", preference_rows(labelled, output_format="ranking", min_margin=0)
    )
    parsed_pairs = data.load(str(pairs), tmp_path / "scratch", data.preference_example)
    assert [(p.chosen, p.rejected) for p in parsed_pairs] == [
        ("great", "ok"),
        ("great", "bad"),
        ("ok", "bad"),
    ]
    [ranking] = data.load(str(ranks), tmp_path / "scratch", data.ranked_example)
    assert ranking.responses == ("great", "ok", "bad")


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_policy(tmp_path_factory.mktemp("generate") / "policy", seed=5)


def _inputs_on_s3(bucket: str, policy: Path, tmp_path: Path) -> dict[str, str]:
    storage.publish_dir(policy, f"s3://{bucket}/inputs/policy")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    storage.write_bytes(f"s3://{bucket}/inputs/prompts.jsonl", prompts.read_bytes())
    return {"model": f"s3://{bucket}/inputs/policy", "data": f"s3://{bucket}/inputs/prompts.jsonl"}


def test_generate_through_s3_labels_with_vader_and_resumes_by_chunk(
    bucket: str, s3: Any, toy_policy: Path, tmp_path: Path
) -> None:
    inputs = _inputs_on_s3(bucket, toy_policy, tmp_path)
    output = f"s3://{bucket}/ns/run/generate"
    hyperparameters: dict[str, Any] = {
        "scorer": "vader",
        "samples_per_prompt": 6,
        "max_new_tokens": 6,
        "chunk_prompts": 8,
        "output_format": "all_pairs",
    }
    config = stage_config(
        tmp_path, stage_type="generate", output=output, inputs=inputs, hyperparameters=hyperparameters
    )
    first = run_stage("generate", config, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in first.steps] == [1, 2, 3]  # 24 prompts in chunks of 8
    local = storage.fetch_dir(f"{output}/artifact", tmp_path / "first", require_manifest=True)
    assert sorted(p.name for p in local.iterdir()) == ["_MANIFEST.json", "preferences.jsonl"]
    rows = read_jsonl(local / "preferences.jsonl")
    assert rows and all(
        set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} for row in rows
    )
    assert all(row["chosen_score"] > row["rejected_score"] and row["chosen"].strip() for row in rows)
    assert {row["prompt"] for row in rows} <= set(PROMPTS)
    metrics = storage.read_json(f"{output}/metrics.json")
    assert metrics["prompts"] == 24 and metrics["samples"] == 144 and metrics["rows"] == len(rows)
    assert first.termination is not None and first.termination["status"] == "succeeded"

    # A preemption during chunk 3: its samples and the artifact never got their manifests.
    storage.delete_prefix(f"{output}/artifact")
    s3.delete_object(Bucket=bucket, Key="ns/run/generate/checkpoints/chunk-00000002/_MANIFEST.json")
    again = run_stage("generate", config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.events("resumed")[0]["chunks_done"] == 2
    assert [r["step"] for r in again.steps] == [3]
    resumed = storage.fetch_dir(f"{output}/artifact", tmp_path / "again", require_manifest=True)
    assert read_jsonl(resumed / "preferences.jsonl") == rows


def test_a_stage_without_a_labeller_fails_naming_the_field(
    toy_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    config = stage_config(
        tmp_path,
        stage_type="generate",
        output=str(tmp_path / "out"),
        inputs={"model": str(toy_policy), "data": str(prompts)},
        hyperparameters={"samples_per_prompt": 2},
    )
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEALIGN_TERMINATION_LOG", str(termination))
    monkeypatch.setenv("KUBEALIGN_SCRATCH", str(tmp_path / "scratch"))
    assert generate.main(["--config", str(config)]) == 2
    assert (
        "inputs.reward_model: the generate stage needs a reward model or hyperparameters.scorer"
        in json.loads(termination.read_text())["error"]
    )


@pytest.mark.slow
def test_generate_on_two_processes_labels_every_prompt_once(toy_policy: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"{p} {i}"} for i, p in enumerate(PROMPTS * 3)]
    )
    config = stage_config(
        tmp_path,
        stage_type="generate",
        output=str(tmp_path / "out"),
        inputs={"model": str(toy_policy), "data": str(prompts)},
        hyperparameters={
            "scorer": "vader",
            "samples_per_prompt": 3,
            "max_new_tokens": 4,
            "output_format": "ranking",
        },
        distributed={"nproc_per_node": 2},
    )
    run = run_stage("generate", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = storage.read_json(str(tmp_path / "out" / "metrics.json"))
    assert metrics["prompts"] == 24 and metrics["samples"] == 72
    rows = read_jsonl(tmp_path / "out" / "artifact" / "rankings.jsonl")
    written = [row["prompt"] for row in rows]
    assert len(written) == len(set(written))
    # Rows come out in prompt order whichever rank sampled them.
    order = [line["prompt"] for line in read_jsonl(prompts)]
    assert written == [p for p in order if p in set(written)]
