"""sampling.completion_kl: the exact per-token KL of the tempered policy to the reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kubealign_jobs import model as models
from kubealign_jobs.sampling import Samples, SamplingParams, completion_kl, sample, sampling_logprobs
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    root = tmp_path_factory.mktemp("kl")
    policy = models.load_causal_lm(save_toy_policy(root / "policy", seed=3))
    reference = models.load_causal_lm(save_toy_policy(root / "reference", seed=4))
    return policy, reference, models.load_tokenizer(root / "policy")


def draw(policy: Any, tokenizer: Any, temperature: float, copies: int = 1, top_p: float = 1.0) -> Samples:
    torch.manual_seed(5)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_p=top_p)
    return sample(policy, tokenizer, list(PROMPTS) * copies, params, batch_size=64)


def test_logprobs_of_the_sampling_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.allclose(sampling_logprobs(logits, 0.5), torch.log_softmax(logits / 0.5, dim=-1))
    # top_p keeps the smallest set of most likely tokens reaching p, renormalised.
    probs = torch.softmax(logits, dim=-1)[0]
    nucleus = sampling_logprobs(logits, 1.0, top_p=float(probs[0] + probs[1]) - 1e-4).exp()[0]
    assert nucleus[2:].tolist() == [0.0, 0.0]
    assert nucleus[:2].tolist() == pytest.approx((probs[:2] / probs[:2].sum()).tolist())
    # Greedy: the point mass on the argmax.
    assert sampling_logprobs(logits, 0.0).exp()[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_a_model_against_itself_at_temperature_one_is_zero(pair: tuple[Any, Any, Any]) -> None:
    policy, _, tokenizer = pair
    samples = draw(policy, tokenizer, 1.0)
    exact, monte_carlo = completion_kl(policy, policy, samples)
    assert exact.abs().max().item() < 1e-5
    assert monte_carlo.abs().max().item() < 1e-5


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 1.5])
def test_exact_kl_is_non_negative_and_positive_between_different_models(
    pair: tuple[Any, Any, Any], temperature: float
) -> None:
    policy, reference, tokenizer = pair
    samples = draw(policy, tokenizer, temperature)
    exact, _ = completion_kl(policy, reference, samples, temperature=temperature)
    assert bool((exact >= -1e-6).all())
    assert exact.mean().item() > 0.01


def test_a_tempered_model_diverges_from_itself(pair: tuple[Any, Any, Any]) -> None:
    policy, _, tokenizer = pair
    samples = draw(policy, tokenizer, 0.5)
    exact, _ = completion_kl(policy, policy, samples, temperature=0.5)
    assert exact.mean().item() > 0.01


def test_exact_and_monte_carlo_agree_in_expectation(pair: tuple[Any, Any, Any]) -> None:
    """Both estimate the same sequence KL; the exact one with a smaller spread."""
    policy, reference, tokenizer = pair
    samples = draw(policy, tokenizer, 1.0, copies=200)
    exact, monte_carlo = completion_kl(policy, reference, samples, batch_size=128)
    n = len(exact)
    standard_error = monte_carlo.std().item() / math.sqrt(n)
    assert abs(exact.mean().item() - monte_carlo.mean().item()) < 4 * standard_error
    assert exact.std().item() < monte_carlo.std().item()


def test_padding_after_eos_adds_nothing(pair: tuple[Any, Any, Any]) -> None:
    policy, reference, tokenizer = pair
    samples = draw(policy, tokenizer, 1.0)
    exact, _ = completion_kl(policy, reference, samples)
    # Change every padded position's token: the masked sum must not move.
    changed = Samples(
        prompts=samples.prompts,
        completions=samples.completions,
        prompt_ids=samples.prompt_ids,
        prompt_mask=samples.prompt_mask,
        completion_ids=torch.where(samples.completion_mask.bool(), samples.completion_ids, 7),
        completion_mask=samples.completion_mask,
    )
    again, _ = completion_kl(policy, reference, changed)
    assert torch.allclose(exact, again, atol=1e-5)
