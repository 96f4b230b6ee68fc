"""FSDP2 sharding, LoRA adapters and distributed checkpoints, on CPU with gloo and real optimiser steps.

Every run is a real stage process (``python -m kubealign_jobs.<stage>``), two of them under
torchrun where a test says so, on the tiny Llama of ``trainer_toys``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubealign_jobs import checkpoint, parallel, storage
from kubealign_jobs.stages import LoraSettings
from tests.jobs.trainer_toys import (
    TINY_LLAMA,
    StageRun,
    preference_rows,
    run_stage,
    run_until_checkpoint,
    save_tiny_lm,
    sft_rows,
    stage_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow

COMMON = {
    "max_steps": 6,
    "batch_size": 4,
    "log_every": 1,
    "checkpoint_every": 2,
    "warmup_steps": 0,
    "learning_rate": 1e-2,
    "max_length": 48,
}
# Two processes sum their gradients in a different order than one: float32 rounding, no more.
REL, ABS = 1e-4, 1e-5


def _inputs(tmp: Path, stage_type: str, *, spec: dict[str, Any] | None = None) -> dict[str, str]:
    """The base model (written once per ``tmp``, from ``spec`` the first time) and the data."""
    base = tmp / "base"
    if not base.exists():
        save_tiny_lm(base, spec=spec)
        write_jsonl(tmp / "sft.jsonl", sft_rows(32))
        write_jsonl(tmp / "prefs.jsonl", preference_rows(32))
    data = str(tmp / ("sft.jsonl" if stage_type == "sft" else "prefs.jsonl"))
    return {"model": str(base), "data": data, "eval_data": data}


def _config(tmp: Path, stage_type: str, name: str, processes: int, **hyper: Any) -> Path:
    extra = {"beta": 0.5} if stage_type == "dpo" else {}
    return stage_config(
        tmp,
        stage_type=stage_type,
        output=f"file://{tmp}/{name}",
        inputs=_inputs(tmp, stage_type),
        hyperparameters={**COMMON, **extra, **hyper},
        distributed={"nnodes": 1, "nproc_per_node": processes},
    )


def _run(tmp: Path, stage_type: str, name: str, processes: int, **hyper: Any) -> StageRun:
    run = run_stage(stage_type, _config(tmp, stage_type, name, processes, **hyper), tmp, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _losses(run: StageRun) -> list[float]:
    return [r["loss"] for r in run.steps]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return lm(input_ids=ids).logits  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- FSDP vs one process


@pytest.mark.parametrize("stage_type", ["sft", "dpo"])
def test_fsdp_two_processes_follow_one(stage_type: str, tmp_path: Path) -> None:
    one = _run(tmp_path, stage_type, "one", 1)
    two = _run(tmp_path, stage_type, "two", 2, sharding="fsdp")

    assert [r["step"] for r in two.steps] == list(range(1, 7))
    assert _losses(two) == pytest.approx(_losses(one), rel=REL, abs=ABS)
    assert _losses(one)[-1] < _losses(one)[0]
    assert [e["shards"] for e in two.events("checkpoint")] == [2, 2, 2]
    # The stage reports its measured peak beside the estimate: the process's resident set on CPU,
    # which holds the interpreter and torch (hundreds of MiB) besides this toy's few KiB of state.
    assert two.termination is not None
    estimate, peak = two.termination["memory_estimate_bytes"], two.termination["memory_peak_bytes"]
    assert 0 < estimate < 100 * 2**20 < peak < 16 * 2**30
    # The artifact is a plain save_pretrained folder with the same weights.
    a, b = _weights(tmp_path / "one/artifact"), _weights(tmp_path / "two/artifact")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # Each rank wrote its own shard of the newest checkpoint.
    newest = checkpoint.latest_checkpoint(f"file://{tmp_path}/two/checkpoints", tmp_path / "ck")
    assert newest is not None and newest.distributed and newest.step == 6
    assert newest.dcp_dir is not None
    assert sorted(p.name for p in newest.dcp_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp_with_tied_embeddings_sends_rank0s_weights(tmp_path: Path) -> None:
    # Rank 1 builds the model without weights and receives its shards from rank 0; with tied
    # embeddings the head and the embedding are one tensor there, and stay one.
    _inputs(tmp_path, "sft", spec={**TINY_LLAMA, "tie_word_embeddings": True})
    runs = {"one": _run(tmp_path, "sft", "one", 1), "two": _run(tmp_path, "sft", "two", 2, sharding="fsdp")}
    assert _losses(runs["two"]) == pytest.approx(_losses(runs["one"]), rel=REL, abs=ABS)
    a, b = _weights(tmp_path / "one/artifact"), _weights(tmp_path / "two/artifact")
    assert set(a) == set(b) and "lm_head.weight" not in b
    # The tied matrix sums the head's and the embedding's gradients, which two processes add in
    # another order: 1.2e-5 apart after 6 steps that moved it by 0.037, as under DDP.
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=5e-5, msg=name)


# ---------------------------------------------------------------------------- resume across world sizes


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_fsdp_run_resumes_at_any_world_size(processes: int, tmp_path: Path) -> None:
    reference = _run(tmp_path, "sft", "whole", 2, sharding="fsdp")
    config = _config(tmp_path, "sft", "killed", 2, sharding="fsdp", keep_checkpoints=5)
    run_until_checkpoint("sft", tmp_path, config, 2)
    checkpoints = tmp_path / "killed/checkpoints"
    # A tiny model's steps take milliseconds: whatever the run wrote after checkpoint 2 before
    # the signal landed goes, so the test sees exactly a kill right after that checkpoint.
    for later in ("step-00000004", "step-00000006"):
        storage.delete_prefix(f"file://{checkpoints / later}")
    storage.delete_prefix(f"file://{tmp_path}/killed/artifact")
    # A half-written newer checkpoint (a shard, no manifest) is skipped for the last complete one.
    (checkpoints / "step-00000004/dcp").mkdir(parents=True, exist_ok=True)
    (checkpoints / "step-00000004/dcp/__0_0.distcp").write_bytes(b"\0" * 100)

    resumed = run_stage(
        "sft",
        _config(tmp_path, "sft", "killed", processes, sharding="fsdp", keep_checkpoints=5),
        tmp_path,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.events("resumed")[0]["step"] == 2
    assert "ignoring checkpoint at step 4" in resumed.stderr
    assert [r["step"] for r in resumed.steps] == [3, 4, 5, 6]
    # Step, optimizer moments, schedule and data position all continue: the same losses.
    assert _losses(resumed) == pytest.approx(_losses(reference)[2:], rel=REL, abs=ABS)
    a, b = _weights(tmp_path / "whole/artifact"), _weights(tmp_path / "killed/artifact")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_changing_the_layout_of_a_checkpoint_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, "sft", "out", 1, sharding="fsdp", max_steps=2)
    storage.delete_prefix(f"file://{tmp_path}/out/artifact")
    run = run_stage("sft", _config(tmp_path, "sft", "out", 1, max_steps=4), tmp_path, timeout=600)
    assert run.returncode == 2
    assert run.termination is not None
    assert "hyperparameters.sharding:" in run.termination["error"]
    assert "distributed (sharded or LoRA) checkpoint" in run.termination["error"]


# ---------------------------------------------------------------------------- LoRA


TARGETS = ["q_proj", "v_proj"]


def test_lora_dpo_trains_only_adapters_against_the_base_reference(tmp_path: Path) -> None:
    lora = {"r": 4, "alpha": 8, "target_modules": TARGETS}
    full = _run(tmp_path, "dpo", "full", 1)
    merged = _run(tmp_path, "dpo", "merged", 1, lora=lora)
    adapter = _run(tmp_path, "dpo", "adapter", 1, lora=lora, lora_merge=False)
    assert merged.events("lora")[0]["trainable_parameters"] < merged.events("lora")[0]["parameters"] / 10
    assert _losses(adapter) == _losses(merged)
    assert _losses(full)[0] == pytest.approx(_losses(merged)[0], rel=1e-6)  # both start at log 2

    # The reference is the base with adapters off: the same log-probs as the base model loaded apart.
    def reference(name: str) -> dict[str, torch.Tensor]:
        path = tmp_path / name / "reference_logps/logps.pt"
        return torch.load(path, weights_only=True)  # type: ignore[no-any-return]

    for split, values in reference("full").items():
        torch.testing.assert_close(reference("merged")[split], values, rtol=0, atol=1e-6)

    # Only the targeted projections moved; every other weight is the base's, bit for bit.
    base, after = _weights(tmp_path / "base"), _weights(tmp_path / "merged/artifact")
    assert set(after) == set(base)
    changed = {name for name in base if not torch.equal(base[name], after[name])}
    assert changed and all(any(f".{t}." in name for t in TARGETS) for name in changed)

    # The adapter alone loads with peft on the base and computes what the merged model does.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (tmp_path / "adapter/artifact/adapter_config.json").is_file()
    peft_lm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter/artifact")
    )
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_lm(input_ids=ids).logits
    torch.testing.assert_close(_logits(tmp_path / "merged/artifact", ids), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(tmp_path / "base", ids), expected, atol=1e-4)


def test_fsdp_lora_and_gradient_checkpointing_together(tmp_path: Path) -> None:
    lora = {"r": 4, "target_modules": TARGETS}
    one = _run(tmp_path, "sft", "one", 1, lora=lora)
    two = _run(tmp_path, "sft", "two", 2, lora=lora, sharding="fsdp", gradient_checkpointing=True)
    assert _losses(two) == pytest.approx(_losses(one), rel=REL, abs=ABS)
    assert _losses(one)[-1] < _losses(one)[0]
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        _logits(tmp_path / "two/artifact", ids), _logits(tmp_path / "one/artifact", ids), rtol=1e-4, atol=1e-4
    )
    # Only adapters are checkpoint state under LoRA: the frozen base is the stage's input.
    newest = checkpoint.latest_checkpoint(f"file://{tmp_path}/two/checkpoints", tmp_path / "ck")
    assert newest is not None and newest.dcp_dir is not None
    metadata = json.dumps(sorted(_dcp_keys(newest.dcp_dir)))
    assert "lora_A" in metadata and "embed_tokens" not in metadata


def _dcp_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    return list(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


# ---------------------------------------------------------------------------- units


def test_merge_adapters_equals_peft_merge() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(  # type: ignore[no-untyped-call]
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    settings = LoraSettings(r=2, alpha=6.0, target_modules="all-linear")
    adapted = parallel.add_adapters(LlamaForCausalLM(config), settings)  # type: ignore[no-untyped-call]
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero; give the adapters something to merge
    state = parallel.merge_adapters(dict(adapted.get_base_model().state_dict()), settings)
    expected = adapted.merge_and_unload().state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, msg=name)


@pytest.mark.parametrize(
    ("items", "world", "size", "lockstep", "expected"),
    [
        # rank 0 and rank 1 of 5 items in batches of 2: rank 1 has 2 items, rank 0 has 3
        (5, 2, 2, True, [[([0, 2], True), ([4], True)], [([1, 3], True), ([0], False)]]),
        (5, 2, 2, False, [[([0, 2], True), ([4], True)], [([1, 3], True)]]),
        (1, 2, 4, True, [[([0], True)], [([0], False)]]),
        (4, 2, 2, True, [[([0, 2], True)], [([1, 3], True)]]),
        (0, 2, 2, True, [[], []]),
    ],
)
def test_lockstep_batches(
    items: int, world: int, size: int, lockstep: bool, expected: list[list[tuple[list[int], bool]]]
) -> None:
    got = [
        list(
            parallel.lockstep_batches(
                list(range(items)), rank=rank, world_size=world, batch_size=size, lockstep=lockstep
            )
        )
        for rank in range(world)
    ]
    assert got == expected
