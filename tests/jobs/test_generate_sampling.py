"""Batched sampling: left padding and the KV cache give the same tokens as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from kubealign_jobs import model as models
from kubealign_jobs.sampling import (
    RowSeededSampling,
    SamplingParams,
    completion_mask,
    sample,
    sampling_logprobs,
)
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


def test_row_seeds_give_each_prompt_its_own_stream_whatever_the_batch(toy: tuple[object, object]) -> None:
    policy, tokenizer = toy
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
    prompts = list(PROMPTS)
    seeds = [100 + index for index in range(len(prompts))]
    together = sample(policy, tokenizer, prompts, params, seeds=seeds)
    # Other batch sizes, the batch reversed, the global RNG disturbed: the same completions.
    torch.manual_seed(12345)
    in_threes = sample(policy, tokenizer, prompts, params, batch_size=3, seeds=seeds)
    backwards = sample(policy, tokenizer, prompts[::-1], params, seeds=seeds[::-1])
    assert in_threes.completions == together.completions
    assert backwards.completions[::-1] == together.completions
    # Another seed is another draw (the toy is nearly uniform: all of them equal would be a bug).
    other = sample(policy, tokenizer, prompts, params, seeds=[seed + 1 for seed in seeds])
    assert other.completions != together.completions
    with pytest.raises(ValueError, match="2 seeds for"):
        sample(policy, tokenizer, prompts, params, seeds=[1, 2])


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.0, 1.0, 2)])
def test_row_seeded_gumbel_max_draws_from_the_sampling_distribution(
    temperature: float, top_p: float, top_k: int
) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    draws = 20_000
    noised = RowSeededSampling(range(draws), params, torch.device("cpu"))(
        torch.zeros(draws, 1, dtype=torch.long), logits.expand(draws, -1)
    )
    counts = torch.bincount(noised.argmax(dim=-1), minlength=4).double() / draws
    expected = logits.clone()
    if top_k:
        expected[0, top_k:] = float("-inf")  # the logits are sorted: top-k keeps the first k
    expected = sampling_logprobs(expected, temperature, top_p).exp()[0].double()
    # Four standard errors of a frequency at n = 20,000 is at most 0.0142.
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.0142)
    assert counts[expected == 0].sum() == 0


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
