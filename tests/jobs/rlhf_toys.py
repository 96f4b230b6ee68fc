"""Tiny, fully local building blocks for the generate, ppo and evaluate tests.

A word-level tokenizer over a dozen words keeps the action space small, so a ground-truth
reward such as "fraction of the word `good`" is found by a random policy often enough for
PPO to learn from in a few steps; the models are tiny Llamas built from a config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from kubealign_jobs import model as models

WORDS = ("the", "movie", "plot", "was", "is", "good", "bad", "fine", "dull", "great", "and", "very")
PROMPTS = (
    "the movie was",
    "the plot is",
    "the movie is very",
    "the plot was",
    "the movie",
    "the plot and the movie",
    "very",
    "the movie was very",
)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials then ``WORDS``; decoding joins words with spaces."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    vocab = {models.PAD_TOKEN: 0, models.BOS_TOKEN: 1, models.EOS_TOKEN: 2, "<unk>": 3}
    vocab.update({word: index + 4 for index, word in enumerate(WORDS)})
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token=models.PAD_TOKEN,
        bos_token=models.BOS_TOKEN,
        eos_token=models.EOS_TOKEN,
        unk_token="<unk>",
    )


def tiny_llama_spec(hidden: int = 32) -> dict[str, Any]:
    return {
        "arch": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }


def save_toy_policy(dest: Path, *, seed: int = 0, hidden: int = 32, initializer_range: float = 0.02) -> Path:
    """A freshly initialised tiny Llama and its tokenizer as a save_pretrained folder.

    The default init gives a nearly uniform next-word distribution; a large ``initializer_range``
    gives a peaked one, far (in KL) from any nearly uniform model.
    """
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    spec = {**tiny_llama_spec(hidden), "initializer_range": initializer_range}
    policy = models.build_causal_lm(spec, tokenizer=tokenizer)
    return models.save_pretrained(policy, tokenizer, dest)


def save_toy_reward_model(dest: Path, *, seed: int = 1) -> Path:
    """A reward model initialised from a tiny causal LM (fresh scalar head), as the reward stage starts."""
    lm_dir = save_toy_policy(dest.parent / f"{dest.name}-lm", seed=seed)
    tokenizer = models.load_tokenizer(lm_dir)
    reward_model = models.load_reward_model(lm_dir, tokenizer=tokenizer)
    return models.save_pretrained(reward_model, tokenizer, dest)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
