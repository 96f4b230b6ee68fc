"""examples/sharded: ``kubealign run --local --processes 2`` takes pretrain -> sft -> generate -> dpo,
sharded with FSDP2 and (sft, dpo) trained as LoRA adapters, to Succeeded; the artifacts load in
plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sharded" / "alignmentrun.yaml"

pytestmark = pytest.mark.slow


def test_sharded_lora_pipeline_runs_with_two_processes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "kubealign.cli", "run", str(EXAMPLE), "--local", "--processes", "2"]
    proc = subprocess.run(
        [*command, "--workdir", str(workdir), "--plain"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "Succeeded"

    storage = workdir / "storage" / "default" / "sharded"
    for stage in ("pretrain", "sft", "dpo"):
        log = (workdir / "logs" / f"{stage}.log").read_text()
        assert "launching 1 x 2 processes" in log, stage
        checkpoints = [json.loads(line) for line in log.splitlines() if '"event": "checkpoint"' in line]
        assert checkpoints and all(c["shards"] == 2 for c in checkpoints), stage
    for stage in ("sft", "dpo"):
        log = (workdir / "logs" / f"{stage}.log").read_text()
        assert '"event": "lora"' in log, stage
        # Merged adapters: a plain folder that transformers loads and that generates.
        artifact = storage / stage / "artifact"
        assert not (artifact / "adapter_config.json").exists()
        lm = AutoModelForCausalLM.from_pretrained(str(artifact))
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))  # type: ignore[no-untyped-call]
        ids = tokenizer("the movie was", return_tensors="pt").input_ids
        out = lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert isinstance(out, torch.Tensor) and out.shape[1] > ids.shape[1]
