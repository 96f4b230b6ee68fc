"""kubealign.fit: stages whose model, as the run states it, cannot fit the install's GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign import fit, plan
from tests.operator.run_builders import manifest, run, src, stage, uri

# Llama-2-7B's shape (6.74B parameters) and a small model, as a pretrain stage states them.
LLAMA_7B = {
    "arch": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
SMALL = {
    "arch": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
GPU_80G = 80 * 2**30


def pipeline(model: dict[str, Any], *, gpus: int = 1, nodes: int = 1, **sft: Any) -> list[dict[str, Any]]:
    resources = {"gpusPerNode": gpus, "nodes": nodes}
    return [
        stage(
            "pretrain",
            "pretrain",
            inputs={"data": uri("s3://d00/corpus")},
            resources=resources,
            hyperparameters={"model": model, "vocab_size": 32000, "block_size": 2048, "batch_size": 8 * gpus},
        ),
        stage(
            "sft",
            "sft",
            inputs={"model": src("pretrain"), "data": uri("s3://d00/sft")},
            resources=resources,
            hyperparameters={
                "max_length": 2048,
                "batch_size": 8 * gpus * nodes,
                "micro_batch_size": 1,
                **sft,
            },
        ),
    ]


def with_ppo(model: dict[str, Any], *, gpus: int = 1, **ppo: Any) -> list[dict[str, Any]]:
    """`pipeline` sharded over 8 GPUs (it fits), then ppo on ``gpus`` GPUs with ``ppo`` settings."""
    return [
        *pipeline(model, gpus=8, sharding="fsdp"),
        stage(
            "ppo",
            "ppo",
            inputs={"model": src("sft"), "data": uri("s3://d00/prompts")},
            resources={"gpusPerNode": gpus},
            hyperparameters={"scorer": "word_fraction", **ppo},
        ),
    ]


@pytest.mark.parametrize(
    ("case", "stages", "misfit"),
    [
        ("7B full fine-tune, unsharded, 1 GPU", pipeline(LLAMA_7B), {"pretrain", "sft"}),
        # ppo also holds a frozen reference, and gathers the whole policy to sample under FSDP.
        ("7B ppo, unsharded, 1 GPU", with_ppo(LLAMA_7B), {"pretrain", "ppo"}),
        ("7B ppo, FSDP over 8 GPUs", with_ppo(LLAMA_7B, gpus=8, sharding="fsdp"), {"pretrain"}),
        ("7B ppo, LoRA on 1 GPU", with_ppo(LLAMA_7B, lora={"r": 16}), {"pretrain"}),
        ("7B, FSDP over 8 GPUs", pipeline(LLAMA_7B, gpus=8, sharding="fsdp"), {"pretrain"}),
        ("7B, LoRA on 1 GPU", pipeline(LLAMA_7B, lora={"r": 16}), {"pretrain"}),
        ("small model on 1 GPU", pipeline(SMALL), set()),
        ("no GPUs: nothing to check", pipeline(LLAMA_7B, gpus=0), set()),
    ],
)
def test_stages_that_cannot_fit_are_named(case: str, stages: list[dict[str, Any]], misfit: set[str]) -> None:
    found = fit.misfits(run(manifest(stages)), GPU_80G)
    assert {message.split()[1] for message in found} == misfit, case
    for message in found:
        assert ") per GPU, more than the 80 GiB of a GPU" in message and "hyperparameters.sharding" in message


def test_a_model_given_by_uri_is_left_to_the_trainer() -> None:
    stages = [
        stage(
            "sft",
            "sft",
            inputs={"model": uri("hf://org/big"), "data": uri("s3://d00/sft")},
            resources={"gpusPerNode": 1},
        )
    ]
    assert fit.misfits(run(manifest(stages)), 1) == ()


@pytest.mark.parametrize(
    ("text", "bytes_"),
    [
        ("80Gi", 80 * 2**30),
        ("40G", 40 * 10**9),
        ("1024", 1024),
        ("0.5Ti", 2**39),
        (None, fit.DEFAULT_GPU_MEMORY),
    ],
)
def test_gpu_memory_quantities(text: str | None, bytes_: int) -> None:
    assert fit.parse_memory(text) == bytes_


def test_gpu_memory_that_is_not_a_quantity_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"KUBEALIGN_GPU_MEMORY: '80 GB' is not a memory quantity"):
        fit.parse_memory("80 GB")


def test_the_condition_and_one_warning_event_per_change() -> None:
    alr = run(manifest(pipeline(LLAMA_7B)))
    misfits = fit.misfits(alr, GPU_80G)
    status = plan.summarize(alr, (), None, (), "2026-12-02T00:00:00Z", misfits=misfits)
    condition = status.condition("MemoryFits")
    assert condition is not None and (condition.status, condition.reason) == (
        "False",
        "EstimateExceedsGPUMemory",
    )
    notes = [n for n in plan.transitions(None, status) if n.reason == "StageWillNotFit"]
    assert len(notes) == 1 and notes[0].type == "Warning" and "stage sft (sft)" in notes[0].message
    again = plan.summarize(alr, (), status, (), "2026-12-02T00:01:00Z", misfits=misfits)
    assert not [n for n in plan.transitions(status, again) if n.reason == "StageWillNotFit"]
    fine = plan.summarize(alr, (), None, (), "2026-12-02T00:00:00Z")
    assert fine.condition("MemoryFits").status == "True"  # type: ignore[union-attr]
