"""The ppo stage end to end: it learns a known reward with bounded KL, runs on S3, resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubealign_jobs import ppo, storage
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, save_toy_reward_model, write_jsonl
from tests.jobs.trainer_toys import parse_records, run_stage, stage_config, stage_env

TOY_REWARD = {"scorer": "word_fraction", "scorer_options": {"words": ["good"]}}
FAST = {
    "rollout_batch_size": 32,
    "mini_batch_size": 8,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
    "init_kl_coef": 0.05,
    "checkpoint_every": 0,
}


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ppo-inputs")
    policy = save_toy_policy(root / "policy", seed=0)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    return {"model": str(policy), "data": str(prompts)}


@pytest.mark.slow
def test_ppo_raises_a_known_reward_while_kl_stays_bounded(toy_inputs: dict[str, str], tmp_path: Path) -> None:
    # Reward: the fraction of the completion's words that are "good". A random policy over the
    # 12-word vocabulary scores ~0.07; the optimum is 1.0 ("good" and stop).
    hyperparameters = {**TOY_REWARD, **FAST, "steps": 20, "target_kl": 4.0, "kl_horizon": 200}
    output = tmp_path / "out"
    config = stage_config(
        tmp_path, stage_type="ppo", output=str(output), inputs=toy_inputs, hyperparameters=hyperparameters
    )
    run = run_stage("ppo", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = run.steps
    assert [r["step"] for r in steps] == list(range(1, 21))
    for record in steps:
        assert {"score", "kl", "entropy", "clip_fraction", "value_loss", "beta"} <= set(record)
    first = sum(r["score"] for r in steps[:3]) / 3
    last = sum(r["score"] for r in steps[-3:]) / 3
    assert first < 0.2
    assert last > first + 0.4, [round(r["score"], 3) for r in steps]
    # Bounded KL: the adaptive controller lowers beta while KL is under its target of 4 nats and
    # raises it again once KL passes the target, so KL settles near it.
    assert max(r["kl"] for r in steps) < 10.0
    lowest = min(range(len(steps)), key=lambda i: steps[i]["beta"])
    assert steps[lowest]["beta"] < 0.05
    assert steps[-1]["beta"] > steps[lowest]["beta"]
    assert any(r["kl"] > 4.0 for r in steps[: lowest + 1])
    assert run.termination is not None and run.termination["status"] == "succeeded"
    assert run.termination["score"] == pytest.approx(steps[-1]["score"])
    # The artifact is a plain causal LM, with the value head beside it.
    artifact = output / "artifact"
    assert storage.is_complete(str(artifact))
    AutoModelForCausalLM.from_pretrained(str(artifact), local_files_only=True)
    assert (artifact / ppo.VALUE_HEAD_FILE).is_file()
    assert json.loads((output / "metrics.json").read_text())["steps"] == 20


def _kill_after_checkpoint(config: Path, tmp: Path, step: int) -> list[dict[str, Any]]:
    """Run the stage and SIGKILL it as soon as it reports the checkpoint at ``step``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubealign_jobs.ppo", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=stage_env(tmp),
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("event") == "checkpoint" and record.get("step") == step:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return parse_records("".join(lines))


@pytest.mark.slow
def test_ppo_through_s3_killed_and_resumed_matches_an_uninterrupted_run(
    toy_inputs: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    hyperparameters = {
        **TOY_REWARD,
        **FAST,
        "rollout_batch_size": 16,
        "steps": 4,
        "checkpoint_every": 2,
        "target_kl": 2.0,
    }
    # Inputs go through S3 too, as the operator runs it.
    storage.publish_dir(Path(toy_inputs["model"]), f"s3://{bucket}/inputs/policy")
    storage.write_bytes(f"s3://{bucket}/inputs/prompts.jsonl", Path(toy_inputs["data"]).read_bytes())
    inputs = {"model": f"s3://{bucket}/inputs/policy", "data": f"s3://{bucket}/inputs/prompts.jsonl"}
    output = f"s3://{bucket}/ns/run/ppo"
    config = stage_config(
        tmp_path, stage_type="ppo", output=output, inputs=inputs, hyperparameters=hyperparameters
    )

    killed = _kill_after_checkpoint(config, tmp_path, step=2)
    assert [r["step"] for r in killed if "event" not in r][-1] >= 2
    assert not storage.is_complete(f"{output}/artifact")

    resumed = run_stage("ppo", config, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in resumed.events("resumed")] == [2]
    assert [r["step"] for r in resumed.steps] == [3, 4]
    assert storage.is_complete(f"{output}/artifact")
    assert resumed.termination is not None and resumed.termination["steps"] == 4

    # The same run without the kill: per-step seeds and the restored optimizer, KL controller and
    # data position make steps 3 and 4 the same rollouts and the same updates.
    reference_config = stage_config(
        tmp_path,
        stage_type="ppo",
        output=str(tmp_path / "straight"),
        inputs=toy_inputs,
        hyperparameters=hyperparameters,
    )
    straight = run_stage("ppo", reference_config, tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for mine, theirs in zip(resumed.steps, straight.steps[-2:], strict=True):
        for key in ("score", "kl", "beta", "value_loss", "clip_fraction"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    resumed_weights = AutoModelForCausalLM.from_pretrained(
        str(storage.fetch_dir(f"{output}/artifact", tmp_path / "resumed-artifact")), local_files_only=True
    ).state_dict()
    straight_weights = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "straight" / "artifact"), local_files_only=True
    ).state_dict()
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("inputs", "hyperparameters", "message"),
    [
        ({}, {"scorer": "vader", "ppo_epoch": 2}, "hyperparameters.ppo_epoch: unknown hyperparameter"),
        ({}, {"scorer": "vader", "mini_batch_size": 5}, "hyperparameters.mini_batch_size: 5 does not divide"),
        (
            {},
            {"scorer": "sentiment"},
            "hyperparameters.scorer: 'sentiment' is not one of vader, word_fraction",
        ),
        ({}, {}, "inputs.reward_model: the ppo stage needs a reward model or hyperparameters.scorer"),
        ({"data": None}, {"scorer": "vader"}, "inputs.data: a ppo stage needs inputs.data (prompts)"),
    ],
)
def test_bad_config_fails_with_exit_2_naming_the_field(
    *,
    toy_inputs: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    inputs: dict[str, Any],
    hyperparameters: dict[str, Any],
    message: str,
) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEALIGN_TERMINATION_LOG", str(termination))
    monkeypatch.setenv("KUBEALIGN_SCRATCH", str(tmp_path / "scratch"))
    merged = {key: value for key, value in {**toy_inputs, **inputs}.items() if value is not None}
    config = stage_config(
        tmp_path,
        stage_type="ppo",
        output=str(tmp_path / "out"),
        inputs=merged,
        hyperparameters=hyperparameters,
    )
    assert ppo.main(["--config", str(config)]) == 2
    result = json.loads(termination.read_text())
    assert result["status"] == "failed"
    assert message in result["error"]
    assert not (tmp_path / "out" / "artifact").exists()


@pytest.mark.slow
def test_ppo_trains_data_parallel_on_two_processes(toy_inputs: dict[str, str], tmp_path: Path) -> None:
    # The runtime relaunches the stage under torchrun (gloo on CPU); each rank rolls out its share
    # of the prompts and DDP all-reduces the gradients; rank 0 alone writes.
    hyperparameters = {**TOY_REWARD, **FAST, "rollout_batch_size": 8, "mini_batch_size": 4, "steps": 2}
    config = stage_config(
        tmp_path,
        stage_type="ppo",
        output=str(tmp_path / "out"),
        inputs=toy_inputs,
        hyperparameters=hyperparameters,
        distributed={"nproc_per_node": 2},
    )
    run = run_stage("ppo", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in run.steps] == [1, 2]
    assert len(run.events("done")) == 1
    assert storage.is_complete(str(tmp_path / "out" / "artifact"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "artifact"), local_files_only=True)


def test_ppo_on_a_reward_model_reports_the_ground_truth_beside_it(
    toy_inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEALIGN_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("KUBEALIGN_SCRATCH", str(tmp_path / "scratch"))
    reward_model = save_toy_reward_model(tmp_path / "reward")
    config = stage_config(
        tmp_path,
        stage_type="ppo",
        output=str(tmp_path / "out"),
        inputs={**toy_inputs, "reward_model": str(reward_model)},
        hyperparameters={**TOY_REWARD, **FAST, "rollout_batch_size": 8, "steps": 2},
    )
    assert ppo.main(["--config", str(config)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # The policy optimises the reward model's score; the word-fraction scorer is only reported.
    assert 0.0 <= metrics["true_score"] <= 1.0
    assert metrics["score"] != metrics["true_score"]
    assert storage.is_complete(str(tmp_path / "out" / "artifact"))


def test_the_value_head_starts_at_zero_and_learns(toy_inputs: dict[str, str]) -> None:
    """Early advantages must come from the rewards, not from a random critic's noise."""
    policy = AutoModelForCausalLM.from_pretrained(toy_inputs["model"])
    model = ppo.PolicyWithValueHead(policy)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    _, values = model(ids, torch.ones_like(ids), 3)
    assert values.shape == (2, 3) and values.abs().max().item() == 0.0
    values.sub(1.0).pow(2).mean().backward()
    assert model.value_head.weight.grad is not None and model.value_head.weight.grad.abs().sum().item() > 0
