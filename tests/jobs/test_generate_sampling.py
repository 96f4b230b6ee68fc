"""Batched sampling: left padding and the KV cache give the same tokens as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from kubealign_jobs import model as models
from kubealign_jobs.sampling import SamplingParams, completion_mask, sample
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    folder = save_toy_policy(tmp_path_factory.mktemp("policy") / "policy", seed=3)
    return models.load_causal_lm(folder), models.load_tokenizer(folder)


def test_greedy_batch_matches_one_prompt_at_a_time(toy: tuple[object, object]) -> None:
    policy, tokenizer = toy
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    batched = sample(policy, tokenizer, list(PROMPTS), params, batch_size=3)
    assert batched.prompt_ids.shape[0] == len(PROMPTS)
    for index, prompt in enumerate(PROMPTS):
        alone = sample(policy, tokenizer, [prompt], params)
        length = int(alone.completion_mask.sum())
        assert batched.completions[index] == alone.completions[0]
        assert int(batched.completion_mask[index].sum()) == length
        assert torch.equal(batched.completion_ids[index, :length], alone.completion_ids[0, :length])
    # Prompts are left-padded: the last prompt column is a real token on every row.
    assert bool(batched.prompt_mask[:, -1].all())


def test_sampling_is_reproducible_under_a_seed_and_respects_lengths(toy: tuple[object, object]) -> None:
    policy, tokenizer = toy
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
    torch.manual_seed(11)
    first = sample(policy, tokenizer, list(PROMPTS), params)
    torch.manual_seed(11)
    second = sample(policy, tokenizer, list(PROMPTS), params)
    assert first.completions == second.completions
    assert first.completion_ids.shape[1] <= 6
    # Everything the mask excludes is padding.
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    assert bool((first.completion_ids[first.completion_mask == 0] == pad).all())


def test_completion_mask_keeps_the_first_eos_and_drops_the_rest() -> None:
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, eos), expected)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 0.0}),
        ("top_k", {"top_k": -1}),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
