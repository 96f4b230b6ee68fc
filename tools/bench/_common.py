"""The pieces the kubealign-against-TRL benchmark scripts share: the tiny models both sides train
and the optimizer step both sides take (`trl_step_args`, `kubealign_step_hyperparameters`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kubealign_jobs import model as models

REPO_ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = REPO_ROOT / "examples" / "sentiment" / "data"
CACHE = Path(os.environ.get("KUBEALIGN_CACHE_DIR", Path.home() / ".cache" / "kubealign"))
# The TRL every comparison runs against (the dev environment's pin); ppo_vs_trl needs 1.12.
TRL_VERSION = "1.16.0"


def run_side(script: str, side: str, settings: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one side of a comparison alone in a fresh process (``script --side SIDE --settings
    JSON``); its result is the JSON object on the last line of its stdout."""
    proc = subprocess.run(
        [sys.executable, script, "--side", side, "--settings", json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def trl_step_args(output_dir: Path, learning_rate: float, *, gpu: bool) -> dict[str, Any]:
    """TRL's TrainingArguments for the step every comparison gives both sides: fused AdamW at a
    constant learning rate, no warmup, clipping at 1.0, logging every step, no checkpoints,
    gradient checkpointing off (TRL's config default is on), fp32 on CPU, bf16 on a GPU."""
    return {
        "output_dir": str(output_dir),
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch_fused",
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "bf16": gpu,
        "fp16": False,
        "use_cpu": not gpu,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def kubealign_step_hyperparameters(
    *, steps: int, batch_size: int, learning_rate: float, max_length: int
) -> dict[str, Any]:
    """The same step as `trl_step_args`, as a kubealign stage's hyperparameters."""
    return {
        "max_steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "grad_clip": 1.0,
        "log_every": 1,
        "checkpoint_every": 0,
        "max_length": max_length,
        "gradient_checkpointing": False,
        "mixed_precision": "bf16" if torch.cuda.is_available() else "no",
    }


def install_trl(version: str = TRL_VERSION, target: Path | None = None) -> Path:
    """TRL ``version`` in ``target`` (default: ``CACHE/trl-<version>``; pip --no-deps --target,
    once), for PYTHONPATH beside the venv's own."""
    target = target or CACHE / f"trl-{version}"
    if not (target / "trl" / "__init__.py").exists():
        print(f"installing TRL {version} into {target} (pip --no-deps --target)", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"trl=={version}",
            ],
            check=True,
        )
    return target


def build_policy_and_reward(
    args: argparse.Namespace, workdir: Path, *, reward_name: str
) -> tuple[Path, Path]:
    """A tokenizer trained on the sentiment corpus, a tiny Llama policy and a reward model from it, on disk.

    Seeded, so every side (and every run) starts from the same weights.
    """
    corpus = (SENTIMENT / "corpus.txt").read_text().splitlines()
    tokenizer = models.train_tokenizer(corpus, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    spec = {
        "arch": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
    }
    policy_dir = models.save_pretrained(
        models.build_causal_lm(spec, tokenizer=tokenizer), tokenizer, workdir / "policy"
    )
    torch.manual_seed(1)
    reward_dir = models.save_pretrained(
        models.load_reward_model(policy_dir, tokenizer=tokenizer), tokenizer, workdir / reward_name
    )
    return policy_dir, reward_dir
