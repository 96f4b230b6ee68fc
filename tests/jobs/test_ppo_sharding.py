"""ppo with FSDP2 sharding and LoRA adapters: real stage processes on CPU (gloo under torchrun).

ppo's rollouts are seeded per (step, rank), so two processes sample the same completions
whether the model is replicated (DDP) or sharded (FSDP), as long as its weights agree: the two
layouts must then follow the same trajectory up to float32 rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kubealign_jobs import checkpoint, ppo, storage
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, save_toy_reward_model, write_jsonl
from tests.jobs.trainer_toys import StageRun, run_stage, stage_config

pytestmark = pytest.mark.slow

HYPERPARAMETERS = {
    "scorer": "word_fraction",
    "scorer_options": {"words": ["good"]},
    "rollout_batch_size": 8,
    "mini_batch_size": 4,
    "ppo_epochs": 2,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
    "init_kl_coef": 0.05,
    "steps": 4,
    "checkpoint_every": 2,
}
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
METRICS = ("score", "kl", "policy_loss", "value_loss", "approx_kl")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ppo-sharding")
    policy = save_toy_policy(root / "policy", seed=0)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    return {"model": str(policy), "data": str(prompts)}


def _run(tmp: Path, inputs: dict[str, str], name: str, processes: int, **hyper: Any) -> StageRun:
    config = stage_config(
        tmp,
        stage_type="ppo",
        output=f"file://{tmp}/{name}",
        inputs=inputs,
        hyperparameters={**HYPERPARAMETERS, **hyper},
        distributed={"nnodes": 1, "nproc_per_node": processes},
    )
    run = run_stage("ppo", config, tmp, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _trajectory(run: StageRun) -> list[list[float]]:
    return [[record[name] for name in METRICS] for record in run.steps]


def _assert_weights_close(a: Path, b: Path, *, atol: float) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=atol, msg=key)


def test_fsdp_ppo_follows_ddp_and_resumes_sharded_at_any_world_size(
    inputs: dict[str, str], tmp_path: Path
) -> None:
    ddp = _run(tmp_path, inputs, "ddp", 2)
    fsdp = _run(tmp_path, inputs, "fsdp", 2, sharding="fsdp")
    torch.testing.assert_close(
        torch.tensor(_trajectory(fsdp)), torch.tensor(_trajectory(ddp)), rtol=1e-4, atol=1e-5
    )
    _assert_weights_close(tmp_path / "fsdp" / "artifact", tmp_path / "ddp" / "artifact", atol=1e-5)
    # The value head is gathered from its shards too.
    for key, value in load_file(str(tmp_path / "fsdp" / "artifact" / ppo.VALUE_HEAD_FILE)).items():
        expected = load_file(str(tmp_path / "ddp" / "artifact" / ppo.VALUE_HEAD_FILE))[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5)
    assert fsdp.termination is not None and fsdp.termination["memory_estimate_bytes"] > 0

    # The step-2 checkpoint is DCP shards; resumed from it (its artifact removed), two
    # processes repeat steps 3-4 exactly, and one process carries on from step 3.
    found = checkpoint.latest_checkpoint(f"file://{tmp_path}/fsdp/checkpoints", tmp_path / "peek")
    assert found is not None and found.distributed and found.step == 2
    for processes in (2, 1):
        name = f"resumed-{processes}"
        shutil.copytree(tmp_path / "fsdp" / "checkpoints", tmp_path / name / "checkpoints")
        resumed = _run(tmp_path, inputs, name, processes, sharding="fsdp")
        assert resumed.events("resumed")[0]["step"] == 2
        assert [r["step"] for r in resumed.steps] == [3, 4]
        if processes == 2:
            torch.testing.assert_close(
                torch.tensor(_trajectory(resumed)), torch.tensor(_trajectory(fsdp)[2:]), rtol=1e-4, atol=1e-5
            )
        AutoModelForCausalLM.from_pretrained(str(tmp_path / name / "artifact"), local_files_only=True)


def test_lora_ppo_trains_adapters_and_head_against_the_base(inputs: dict[str, str], tmp_path: Path) -> None:
    run = _run(tmp_path, inputs, "lora", 1, lora=LORA, lora_merge=False)
    # The reference is the base with the adapters off, and LoRA starts as the identity: the
    # first rollout's policy and reference agree exactly.
    assert run.steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert run.steps[-1]["kl"] != pytest.approx(0.0, abs=1e-6)
    lora_event = run.events("lora")[0]
    assert 0 < lora_event["trainable_parameters"] < lora_event["parameters"] / 2
    artifact = tmp_path / "lora" / "artifact"
    assert storage.is_complete(str(artifact))
    adapter = load_file(str(artifact / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert (artifact / ppo.VALUE_HEAD_FILE).is_file()

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(inputs["model"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(inputs["model"]), str(artifact))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_fsdp_lora_and_gradient_checkpointing_ppo_on_two_processes(
    inputs: dict[str, str], tmp_path: Path
) -> None:
    run = _run(tmp_path, inputs, "all", 2, sharding="fsdp", lora=LORA, gradient_checkpointing=True, steps=2)
    assert [r["step"] for r in run.steps] == [1, 2]
    assert run.steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # The artifact is the merged model: plain transformers loads it, and it moved off the base.
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all" / "artifact"), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(inputs["model"])
    moved = [
        name
        for (name, p), q in zip(merged.named_parameters(), base.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert moved and all("proj" in name for name in moved), moved


def test_a_separate_critic_shards_like_the_policy(inputs: dict[str, str], tmp_path: Path) -> None:
    # value_model: separate, initialised from the reward model (InstructGPT's layout): a second
    # backbone whose layers FSDP shards too; the sharded run follows the replicated one.
    reward_model = save_toy_reward_model(tmp_path / "reward")
    with_reward = {**inputs, "reward_model": str(reward_model)}
    settings = {"value_model": "separate", "steps": 2, "checkpoint_every": 0}
    ddp = _run(tmp_path, with_reward, "ddp", 2, **settings)
    fsdp = _run(tmp_path, with_reward, "fsdp", 2, sharding="fsdp", **settings)
    torch.testing.assert_close(
        torch.tensor(_trajectory(fsdp)), torch.tensor(_trajectory(ddp)), rtol=1e-4, atol=1e-5
    )
    from transformers import AutoModelForSequenceClassification

    critics = [
        AutoModelForSequenceClassification.from_pretrained(
            str(tmp_path / name / "artifact" / ppo.VALUE_MODEL_DIR)
        )
        for name in ("ddp", "fsdp")
    ]
    initial = AutoModelForSequenceClassification.from_pretrained(str(reward_model))
    for (name, p), q in zip(critics[0].named_parameters(), critics[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    assert any(
        not torch.equal(p, r) for p, r in zip(critics[0].parameters(), initial.parameters(), strict=True)
    )
    assert not (tmp_path / "fsdp" / "artifact" / ppo.VALUE_HEAD_FILE).exists()


def test_a_separate_critic_resumes_from_a_full_checkpoint(inputs: dict[str, str], tmp_path: Path) -> None:
    # Replicated and without adapters, a checkpoint is a full folder: the critic is saved beside
    # the policy (value_model/) and loaded back, so the resumed steps repeat the original ones.
    first = _run(tmp_path, inputs, "first", 1, value_model="separate")
    found = checkpoint.latest_checkpoint(f"file://{tmp_path}/first/checkpoints", tmp_path / "peek")
    assert found is not None and not found.distributed and found.step == 2
    assert (found.model_dir / ppo.VALUE_MODEL_DIR / "config.json").is_file()
    shutil.copytree(tmp_path / "first" / "checkpoints", tmp_path / "again" / "checkpoints")
    again = _run(tmp_path, inputs, "again", 1, value_model="separate")
    assert again.events("resumed")[0]["step"] == 2
    torch.testing.assert_close(
        torch.tensor(_trajectory(again)), torch.tensor(_trajectory(first)[2:]), rtol=1e-5, atol=1e-6
    )
