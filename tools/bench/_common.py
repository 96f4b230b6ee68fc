"""The pieces the kubealign-against-TRL benchmark scripts share: the tiny models both sides train."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from kubealign_jobs import model as models

REPO_ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = REPO_ROOT / "examples" / "sentiment" / "data"


def install_trl(version: str, target: Path) -> Path:
    """TRL ``version`` in ``target`` (pip --no-deps --target, once), for PYTHONPATH beside the venv's own."""
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
