"""What generate writes, the reward and dpo stages train on: pairs for both, rankings for reward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, write_jsonl
from tests.jobs.trainer_toys import StageRun, run_stage, stage_config

TRAIN_BRIEFLY = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "log_every": 1, "warmup_steps": 0}


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_policy(tmp_path_factory.mktemp("feeds") / "policy", seed=11)


def _generate(tmp: Path, policy: Path, output_format: str) -> Path:
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    output = tmp / f"generate-{output_format}"
    hyperparameters = {
        "scorer": "vader",
        "samples_per_prompt": 6,
        "max_new_tokens": 6,
        "output_format": output_format,
    }
    config = stage_config(
        tmp,
        stage_type="generate",
        output=str(output),
        inputs={"model": str(policy), "data": str(prompts)},
        hyperparameters=hyperparameters,
    )
    run = run_stage("generate", config, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return output / "artifact"


def _train(tmp: Path, stage_type: str, policy: Path, dataset: str, extra: dict[str, Any]) -> StageRun:
    config = stage_config(
        tmp,
        stage_type=stage_type,
        output=str(tmp / f"{stage_type}-{Path(dataset).parent.name}"),
        inputs={"model": str(policy), "data": dataset},
        hyperparameters={**TRAIN_BRIEFLY, **extra},
    )
    return run_stage(stage_type, config, tmp)


@pytest.mark.slow
def test_generated_pairs_train_reward_and_dpo_and_rankings_train_reward(
    toy_policy: Path, tmp_path: Path
) -> None:
    pairs = _generate(tmp_path, toy_policy, "best_worst")
    rankings = _generate(tmp_path, toy_policy, "ranking")
    # The trainers read the generate stage's artifact prefix, as the operator wires it.
    runs = {
        "reward on pairs": _train(tmp_path, "reward", toy_policy, str(pairs), {}),
        "dpo on pairs": _train(tmp_path, "dpo", toy_policy, str(pairs), {}),
        "reward on rankings": _train(tmp_path, "reward", toy_policy, str(rankings), {}),
    }
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr[-3000:]}"
        assert [r["step"] for r in run.steps] == [1, 2], name
        assert run.termination is not None and run.termination["status"] == "succeeded", name


def test_a_generate_artifact_prefix_is_a_dataset(tmp_path: Path) -> None:
    from kubealign_jobs import data, storage

    row = {
        "prompt": "the movie",
        "chosen": "good",
        "rejected": "bad",
        "chosen_score": 0.4,
        "rejected_score": -0.5,
    }
    write_jsonl(tmp_path / "rows" / "preferences.jsonl", [row])
    storage.publish_dir(tmp_path / "rows", str(tmp_path / "artifact"))
    assert data.load(str(tmp_path / "artifact"), tmp_path / "scratch", data.preference_example)
