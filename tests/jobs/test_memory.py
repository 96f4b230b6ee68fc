"""The per-device memory estimate: exact parameter counts, and each setting moving the right term."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign_jobs import memory, parallel
from kubealign_jobs.stages import LoraSettings
from tests.jobs.trainer_toys import TINY_LLAMA

LLAMA2_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}


def test_parameter_count_of_llama2_7b_is_exact() -> None:
    shape = memory.shape_from_config(LLAMA2_7B)
    assert shape is not None and shape.parameters == 6_738_415_616


@pytest.mark.parametrize(
    "spec", [TINY_LLAMA, {**TINY_LLAMA, "tie_word_embeddings": True, "num_key_value_heads": 1}]
)
def test_parameter_and_lora_counts_match_transformers_and_peft(spec: dict[str, Any]) -> None:
    from kubealign_jobs import model as models

    tokenizer = models.train_tokenizer(["the movie was good"] * 4, vocab_size=300)
    lm = models.build_causal_lm(dict(spec), tokenizer=tokenizer)
    shape = memory.shape_from_config(lm.config.to_dict())
    assert shape is not None and shape.parameters == models.count_parameters(lm)
    for targets in ("all-linear", ("q_proj", "v_proj")):
        adapted = parallel.add_adapters(lm, LoraSettings(r=4, target_modules=targets))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert shape.lora_parameters(4, targets) == trainable, targets
        lm = adapted.unload()


def test_gpt2_shape_is_read() -> None:
    config = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 300}
    shape = memory.shape_from_config(config)
    assert shape is not None and shape.intermediate == 128 and not shape.gated
    assert memory.shape_from_config({"architectures": ["Whatever"]}) is None


@pytest.mark.parametrize(
    ("settings", "check"),
    [
        # FSDP over 8 divides parameters, gradients and optimizer state by 8.
        ({"sharding": "fsdp"}, lambda e, base: e.optimizer * 8 == base.optimizer),
        ({"sharding": "fsdp"}, lambda e, base: e.activations == base.activations),
        # LoRA: the frozen base stays, its gradients and moments go.
        ({"lora": (8, "all-linear")}, lambda e, base: e.gradients < base.gradients / 100),
        ({"lora": (8, "all-linear")}, lambda e, base: e.parameters >= base.parameters),
        # Checkpointing keeps one layer's activations plus each layer's input.
        ({"gradient_checkpointing": True}, lambda e, base: e.activations < base.activations / 4),
        # Offload: nothing of the model state on the device.
        (
            {"sharding": "fsdp", "cpu_offload": True},
            lambda e, base: (
                e.optimizer == 0 and e.offloaded * 8 == sum((base.parameters, base.gradients, base.optimizer))
            ),
        ),
        # bf16: autocast copies on top, half-size activations.
        ({"mixed_precision": "bf16"}, lambda e, base: e.parameters == base.parameters * 3 // 2),
    ],
)
def test_each_setting_moves_its_term(settings: dict[str, Any], check: Any) -> None:
    shape = memory.shape_from_config(LLAMA2_7B)
    assert shape is not None
    base = memory.estimate(shape, processes=8, tokens=4096)
    assert check(memory.estimate(shape, processes=8, tokens=4096, **settings), base)


def test_a_7b_full_fine_tune_does_not_fit_an_80gb_gpu_unsharded() -> None:
    shape = memory.shape_from_config(LLAMA2_7B)
    assert shape is not None
    unsharded = memory.estimate(shape, processes=8, mixed_precision="bf16", tokens=2048)
    sharded = memory.estimate(
        shape, processes=8, sharding="fsdp", mixed_precision="bf16", gradient_checkpointing=True, tokens=2048
    )
    assert unsharded.total > 80 * memory.GIB > sharded.total
    assert "GiB (parameters" in unsharded.describe()


def test_ppo_counts_its_reference_and_the_policy_gathered_for_sampling() -> None:
    from kubealign_jobs.stages import PPOHyperparameters

    def ppo(**settings: Any) -> memory.Estimate:
        hp = PPOHyperparameters(mini_batch_size=4, rollout_batch_size=8, **settings)
        found = memory.for_stage(LLAMA2_7B, hp, processes=8, mixed_precision="no", pairs=False)
        assert found is not None
        return found

    shape = memory.shape_from_config(LLAMA2_7B)
    assert shape is not None
    p = shape.parameters
    tokens = 4 * (128 + 32)  # mini_batch_size rows of max_prompt_tokens + max_new_tokens
    plain = memory.estimate(shape, processes=8, tokens=tokens)
    # Unsharded: the policy's weights and a frozen reference of the same size.
    assert ppo().parameters == plain.parameters + 4 * p
    assert ppo().activations == plain.activations
    # FSDP: a 1/8 shard of each, plus the whole policy gathered for sampling.
    assert ppo(sharding="fsdp").parameters == 4 * p // 8 + 4 * p // 8 + 4 * p
    # LoRA: the reference is the base with the adapters off, no second copy.
    lora = ppo(lora={"r": 8})
    assert lora.parameters == 4 * (p + shape.lora_parameters(8, "all-linear"))
    # A separate critic: a second backbone with its own gradients and moments.
    critic = ppo(value_model="separate")
    assert critic.optimizer == ppo().optimizer + 8 * p
    assert critic.activations > ppo().activations
