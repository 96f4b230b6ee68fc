"""The reward stage's scorer: the last-token shortcut gives transformers' scores and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kubealign_jobs import data
from kubealign_jobs import model as models
from tests.jobs.trainer_toys import TINY_GPT2, TINY_LLAMA, sentences


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return models.train_tokenizer(sentences(200), vocab_size=300)


def _reward_model(tokenizer: PreTrainedTokenizerFast, spec: dict[str, Any]) -> PreTrainedModel:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = models.build_causal_lm(dict(spec), tokenizer=tokenizer).config
    config.num_labels = 1
    scorer: PreTrainedModel = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    torch.nn.init.normal_(scorer.score.weight, std=0.5)  # type: ignore[union-attr, arg-type]
    models.disable_dropout(scorer)  # as the reward stage does: two forwards must be comparable
    return scorer


def _batch(tokenizer: PreTrainedTokenizerFast) -> data.CompletionBatch:
    texts = [
        ("Review the plot:", " it was good."),
        ("The cast", " was dull and the ending was awful, truly awful."),
        ("x", " y"),
        ("A film", " to remember."),
    ]
    encoded = [data.encode_prompt_completion(tokenizer, p, c, max_length=64) for p, c in texts]
    return data.collate(encoded, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("spec", [TINY_LLAMA, {**TINY_LLAMA, "num_key_value_heads": 4}, TINY_GPT2])
def test_last_token_scores_and_gradients_match_the_full_forward(
    tokenizer: PreTrainedTokenizerFast, spec: dict[str, Any]
) -> None:
    scorer = _reward_model(tokenizer, spec)
    wrapper = models.LastTokenReward(scorer)
    assert wrapper.last_layer_on_scored_token == (spec["arch"] == "llama")
    batch = _batch(tokenizer)
    assert not bool(batch.attention_mask.all())  # rows of different lengths: padding is exercised

    full = models.reward_scores(scorer, batch.input_ids, batch.attention_mask)
    (full * torch.arange(1.0, 5.0)).sum().backward()  # type: ignore[no-untyped-call]
    expected = {name: p.grad.clone() for name, p in scorer.named_parameters() if p.grad is not None}
    scorer.zero_grad(set_to_none=True)

    fast = models.reward_scores(wrapper, batch.input_ids, batch.attention_mask)
    (fast * torch.arange(1.0, 5.0)).sum().backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert full.std() > 1e-3  # distinct scores, so a wrong row or position would show
    for name, param in scorer.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_left_padded_rows_take_the_full_forward(tokenizer: PreTrainedTokenizerFast) -> None:
    scorer = _reward_model(tokenizer, TINY_LLAMA).eval()  # type: ignore[no-untyped-call]
    batch = _batch(tokenizer)
    lengths = batch.attention_mask.sum(dim=1)
    width = batch.input_ids.shape[1]
    # Move every row's tokens to the right end (left padding).
    shift = [torch.roll(row, int(width - n)) for row, n in zip(batch.input_ids, lengths, strict=True)]
    masks = [torch.roll(row, int(width - n)) for row, n in zip(batch.attention_mask, lengths, strict=True)]
    left_ids, left_mask = torch.stack(shift), torch.stack(masks)
    with torch.no_grad():
        right = models.reward_scores(scorer, batch.input_ids, batch.attention_mask)
        left = models.reward_scores(models.LastTokenReward(scorer), left_ids, left_mask)
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-5)
