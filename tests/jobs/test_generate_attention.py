"""The broadcast-built SDPA mask equals transformers' vmap-built one, and models using it sample the same."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.masking_utils import (
    causal_mask_function,
    sdpa_mask_recent_torch,
    sliding_window_causal_mask_function,
)

from kubealign_jobs import model as models
from kubealign_jobs.attention import IMPLEMENTATION, broadcast_sdpa_mask, use_fast_masks
from kubealign_jobs.sampling import SamplingParams, completion_logps, sample
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy


@pytest.mark.parametrize(
    ("batch", "queries", "keys", "first_query"),
    [(3, 5, 5, 0), (3, 1, 9, 8), (2, 4, 7, 3), (1, 6, 6, 0)],
)
@pytest.mark.parametrize("mask_function", [causal_mask_function, sliding_window_causal_mask_function(3)])
@pytest.mark.parametrize("padded", [True, False])
def test_mask_equals_transformers(
    *, batch: int, queries: int, keys: int, first_query: int, mask_function: Callable[..., Any], padded: bool
) -> None:
    attention_mask = torch.ones(batch, keys, dtype=torch.long)
    if padded:
        attention_mask[0, :2] = 0  # left padding
        attention_mask[-1, -1:] = 0  # right padding
    arguments: dict[str, Any] = {
        "batch_size": batch,
        "cache_position": torch.arange(first_query, first_query + queries),
        "kv_length": keys,
        "mask_function": mask_function,
        "attention_mask": attention_mask,
    }
    for skip in (True, False):
        expected = sdpa_mask_recent_torch(**arguments, allow_is_causal_skip=skip)
        got = broadcast_sdpa_mask(**arguments, allow_is_causal_skip=skip)
        if expected is None:
            assert got is None
        else:
            assert got is not None and torch.equal(got, expected)


def test_fast_masks_sample_and_score_identically_and_are_not_saved(tmp_path: Path) -> None:
    folder = save_toy_policy(tmp_path / "policy", seed=8)
    tokenizer = models.load_tokenizer(folder)
    stock = models.load_causal_lm(folder)
    fast = use_fast_masks(models.load_causal_lm(folder))
    assert fast.config._attn_implementation == IMPLEMENTATION
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(3)
    expected = sample(stock, tokenizer, list(PROMPTS), params)
    torch.manual_seed(3)
    got = sample(fast, tokenizer, list(PROMPTS), params)
    assert got.completions == expected.completions
    torch.testing.assert_close(completion_logps(fast, got), completion_logps(stock, expected))
    fast.save_pretrained(tmp_path / "saved")
    assert "kubealign" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
