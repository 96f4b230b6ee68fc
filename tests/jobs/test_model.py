"""Models: building, offline loading, and log-prob paths that must agree exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kubealign_jobs import data
from kubealign_jobs import model as models
from tests.jobs.trainer_toys import TINY_GPT2, TINY_LLAMA, sentences

TINY_GEMMA = {  # not in PLAIN_HEAD_MODEL_TYPES: exercises the full-forward fallback
    "arch": "gemma",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return models.train_tokenizer(sentences(200), vocab_size=300)


def _batch(tokenizer: PreTrainedTokenizerFast) -> data.CompletionBatch:
    pairs = [
        ("Review the plot:", " it was good."),
        ("The cast", " was dull and the ending was awful."),
        ("x", " y"),
    ]
    encoded = [data.encode_prompt_completion(tokenizer, p, c, max_length=64) for p, c in pairs]
    return data.collate(encoded, pad_token_id=tokenizer.pad_token_id)


def _reference_logps(lm: torch.nn.Module, batch: data.CompletionBatch) -> torch.Tensor:
    """The textbook computation: full logits with the padding mask, log_softmax, gather, mask."""
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return logps * batch.completion_mask[:, 1:]


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT2, TINY_GEMMA], ids=["llama", "gpt2", "gemma"])
def test_log_prob_paths_agree(tokenizer: PreTrainedTokenizerFast, spec: dict[str, Any]) -> None:
    torch.manual_seed(0)
    lm = models.build_causal_lm(dict(spec), tokenizer=tokenizer).double().eval()  # type: ignore[no-untyped-call]
    batch = _batch(tokenizer)
    expected = _reference_logps(lm, batch)
    generic = models.token_logps(lm, batch.input_ids, batch.attention_mask, batch.completion_mask)
    wrapper = models.CompletionLogps(lm)
    assert wrapper.head_only_on_completions == (spec["arch"] != "gemma")
    shortcut = models.token_logps(wrapper, batch.input_ids, batch.attention_mask, batch.completion_mask)
    torch.testing.assert_close(generic, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(shortcut, expected, rtol=0, atol=1e-10)
    sums = models.sequence_logps(wrapper, batch.input_ids, batch.attention_mask, batch.completion_mask)
    torch.testing.assert_close(sums, expected.sum(-1), rtol=0, atol=1e-10)
    assert (expected[batch.completion_mask[:, 1:] == 0] == 0).all() and (sums < 0).all()


def test_completion_logps_gradients_match_full_forward(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    lm = models.build_causal_lm(dict(TINY_LLAMA), tokenizer=tokenizer).double()
    batch = _batch(tokenizer)
    full = torch.autograd.grad(_reference_logps(lm, batch).sum(), list(lm.parameters()))
    wrapper = models.CompletionLogps(lm)
    short = torch.autograd.grad(
        models.sequence_logps(wrapper, batch.input_ids, batch.attention_mask, batch.completion_mask).sum(),
        list(lm.parameters()),
    )
    for a, b in zip(full, short, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_left_padded_rows_keep_their_mask() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kept = models.causal_attention_mask(right)
    assert kept is not None and torch.equal(kept, torch.ones_like(right))
    assert models.causal_attention_mask(left) is left


def test_reward_scores_read_the_last_real_token(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm_dir = models.save_pretrained(
        models.build_causal_lm(dict(TINY_LLAMA), tokenizer=tokenizer),
        tokenizer,
        tmp_path / "lm",
    )
    scorer = models.load_reward_model(lm_dir, tokenizer=tokenizer).eval()  # type: ignore[no-untyped-call]
    batch = _batch(tokenizer)
    together = models.reward_scores(scorer, batch.input_ids, batch.attention_mask)
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        alone = models.reward_scores(
            scorer, batch.input_ids[row : row + 1, :length], batch.attention_mask[row : row + 1, :length]
        )
        torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-5, atol=1e-6)


def test_no_hub_names(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="not a local directory"):
        models.load_causal_lm(Path("meta-llama/Llama-3-8B"))
    with pytest.raises(models.ModelError, match="cannot build 'nope'"):
        models.build_causal_lm({"arch": "nope"}, tokenizer=models.train_tokenizer(["a b"], vocab_size=260))


def test_a_damaged_gguf_file_is_refused_naming_it_and_leaves_no_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)  # the magic, then nothing a reader can use
    dest = tmp_path / "model-from-gguf"
    with pytest.raises(models.ModelError, match=r"model\.gguf: not a loadable GGUF model"):
        models.gguf_to_pretrained(gguf, dest)
    assert not dest.exists()
    with pytest.raises(models.ModelError, match=r"missing\.gguf is not a GGUF file"):
        models.gguf_to_pretrained(tmp_path / "missing.gguf", dest)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GEMMA], ids=["llama", "gemma"])
def test_packed_rows_give_the_padded_batch_log_probs_and_gradients(
    tokenizer: PreTrainedTokenizerFast, spec: dict[str, Any]
) -> None:
    """Sequences end to end with restarting positions: each sees only itself, as when padded apart."""
    torch.manual_seed(0)
    lm = models.build_causal_lm(dict(spec), tokenizer=tokenizer).double()
    texts = [("the movie was", " good and long"), ("a", " plot that never ends at all"), ("the cast", " was")]
    encoded = [data.encode_prompt_completion(tokenizer, p, c, max_length=64) for p, c in texts]
    padded = data.collate(encoded, pad_token_id=int(tokenizer.pad_token_id))
    packed = data.collate_packed(encoded)
    assert packed.input_ids.shape == (1, sum(len(e.ids) for e in encoded))
    assert packed.num_completion_tokens == padded.num_completion_tokens
    wrapper = models.CompletionLogps(lm)

    def total(batch: data.CompletionBatch) -> torch.Tensor:
        return models.token_logps(
            wrapper, batch.input_ids, batch.attention_mask, batch.completion_mask, batch.position_ids
        ).sum()

    want, got = total(padded), total(packed)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    grads_padded = torch.autograd.grad(want, list(lm.parameters()))
    grads_packed = torch.autograd.grad(got, list(lm.parameters()))
    for a, b in zip(grads_padded, grads_packed, strict=True):  # Gemma normalises in float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # Attention really is confined: without restarting positions the same row gives other numbers.
    leaky = data.CompletionBatch(packed.input_ids, packed.attention_mask, packed.completion_mask)
    assert abs(float(total(leaky).detach()) - float(want.detach())) > 1e-3
