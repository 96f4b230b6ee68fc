"""Batched sampling from a causal LM with a KV cache: the rollouts of generate, ppo and evaluate.

Prompts are left-padded so every row's next token is generated at the same position (the
layout ``model.generate`` and its KV cache expect); completions come back right-padded, with
a mask that covers each completion up to and including its first end-of-sequence token.
Everything after that token is padding, whatever the model emitted there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional
from transformers import LogitsProcessorList

from kubealign_jobs import data
from kubealign_jobs import model as models


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        # top_k=0 disables HF's default top-k of 50: sampling is from the full (top-p) distribution,
        # which is the policy whose log-probs PPO and the KL estimates use.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@dataclass(frozen=True)
class Samples:
    """One completion per prompt row. Prompts left-padded, completions right-padded.

    prompt_ids, prompt_mask:          (B, P) long
    completion_ids, completion_mask:  (B, C) long; the mask is 1 up to and including the first EOS
    """

    prompts: list[str]
    completions: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion in one (B, P + C) tensor, as the scoring forward pass takes them."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def __len__(self) -> int:
        return len(self.prompts)


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 on left padding), as ``generate`` numbers a
    left-padded prompt."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, **kwargs: Any
) -> Any:
    """The model's output with logits (B, width, V) for the last ``width`` tokens of ``input_ids``.

    Position ids count real tokens only, as ``generate`` numbers a left-padded prompt, so the
    log-probs match the distribution the tokens were sampled from. Only the ``width + 1`` last
    positions go through the LM head: the prompt positions predict nothing that is scored.
    """
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=real_token_positions(attention_mask),
        logits_to_keep=width + 1,
        use_cache=False,
        **kwargs,
    )
    output.logits = output.logits[:, :-1]
    return output


@torch.no_grad()
def completion_logps(model: Any, samples: Samples, *, batch_size: int = 64) -> torch.Tensor:
    """Per-token log-probs (B, C) of the sampled completions under ``model`` (temperature 1), 0 on padding."""
    device = next(model.parameters()).device
    width = samples.completion_ids.shape[1]
    parts = []
    for start in range(0, len(samples), batch_size):
        rows = slice(start, start + batch_size)
        logits = completion_logits(
            model, samples.input_ids[rows].to(device), samples.attention_mask[rows].to(device), width
        ).logits
        parts.append(models.logps_from_logits(logits, samples.completion_ids[rows].to(device)).cpu())
    return torch.cat(parts) * samples.completion_mask


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """log-probs (..., V) of the distribution ``sample`` draws from: logits / T, then nucleus top-p.

    Tokens outside the nucleus get -inf. The nucleus is the one ``generate`` keeps: the most
    likely tokens whose probabilities sum to at least ``top_p`` (always at least one).
    Temperature 0 (greedy decoding) is the point mass on the most likely token.
    """
    if temperature <= 0:
        best = logits.argmax(dim=-1, keepdim=True)
        greedy = torch.full(logits.shape, float("-inf"), device=logits.device)
        return greedy.scatter(-1, best, 0.0)
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logprobs
    ascending, order = torch.sort(logprobs, dim=-1)
    # Drop the least likely tokens while what they add up to stays within 1 - top_p.
    drop = torch.cumsum(ascending.exp(), dim=-1) <= 1 - top_p
    drop[..., -1] = False
    dropped = drop.scatter(-1, order, drop)
    return torch.log_softmax(logprobs.masked_fill(dropped, float("-inf")), dim=-1)


@torch.no_grad()
def completion_kl(
    policy: Any,
    reference: Any,
    samples: Samples,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(π_T ‖ π_ref) of each sampled completion, two ways -> (exact, monte_carlo), each (B,).

    ``samples`` were drawn from ``policy`` at ``temperature`` (and ``top_p``): π_T is that
    sampling distribution, π_ref the reference at temperature 1.

    - exact: Σ_t KL(π_T(·|y<t) ‖ π_ref(·|y<t)), each term summed over the whole vocabulary,
      along the sampled prefixes y<t. Its mean over samples is an unbiased estimate of the
      sequence-level KL with far less variance than the log-ratio's (the vocabulary sum is done
      exactly; only the prefixes are sampled).
    - monte_carlo: Σ_t log π_T(y_t|y<t) - log π_ref(y_t|y<t), the plain estimator, for checking.

    Padding after each completion's first EOS contributes nothing.
    """
    device = next(policy.parameters()).device
    width = samples.completion_ids.shape[1]
    exact, monte_carlo = [], []
    for start in range(0, len(samples), batch_size):
        rows = slice(start, start + batch_size)
        input_ids = samples.input_ids[rows].to(device)
        attention_mask = samples.attention_mask[rows].to(device)
        mask = samples.completion_mask[rows].to(device).float()
        tokens = samples.completion_ids[rows].to(device)
        logp = sampling_logprobs(
            completion_logits(policy, input_ids, attention_mask, width).logits, temperature, top_p
        )
        logr = torch.log_softmax(
            completion_logits(reference, input_ids, attention_mask, width).logits.float(), dim=-1
        )
        # 0 * log 0 = 0 for tokens outside the nucleus.
        terms = torch.where(logp.isinf(), torch.zeros_like(logp), logp.exp() * (logp - logr)).sum(dim=-1)
        ratio = (logp - logr).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        exact.append((terms * mask).sum(dim=1).cpu())
        monte_carlo.append((ratio * mask).sum(dim=1).cpu())
    return torch.cat(exact), torch.cat(monte_carlo)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 on each token up to and including the first ``eos_token_id`` of its row, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    is_eos = (completion_ids == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long()


def concat_samples(parts: Sequence[Samples], *, pad_token_id: int) -> Samples:
    """Join sample batches, re-padding prompts on the left and completions on the right."""
    if not parts:
        raise ValueError("concat_samples: nothing to join")
    prompt_width = max(part.prompt_ids.shape[1] for part in parts)
    completion_width = max(part.completion_ids.shape[1] for part in parts)

    def left(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return functional.pad(tensor, (prompt_width - tensor.shape[1], 0), value=value)

    def right(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return functional.pad(tensor, (0, completion_width - tensor.shape[1]), value=value)

    return Samples(
        prompts=[prompt for part in parts for prompt in part.prompts],
        completions=[completion for part in parts for completion in part.completions],
        prompt_ids=torch.cat([left(part.prompt_ids, pad_token_id) for part in parts]),
        prompt_mask=torch.cat([left(part.prompt_mask, 0) for part in parts]),
        completion_ids=torch.cat([right(part.completion_ids, pad_token_id) for part in parts]),
        completion_mask=torch.cat([right(part.completion_mask, 0) for part in parts]),
    )


class RowSeededSampling:
    """A ``generate`` logits processor that samples each row from its own seeded stream.

    Gumbel-max: adding independent Gumbel(0, 1) noise to the log-probs of the sampling
    distribution (`sampling_logprobs`, top-k applied first) and taking the argmax draws exactly
    from that distribution, so ``generate`` runs greedy over the noised scores. Each row draws
    its noise from a generator seeded with its own seed, so a row's completion depends on its
    seed and the model alone: not on which other prompts share its batch, the batch size, or how
    many processes split the rollout.

    The noise of ``block`` tokens is drawn per row at once (one generator call per row per block,
    not per token: the per-call overhead was most of the cost); ``block`` depends only on the
    vocabulary and the completion length, so the streams stay independent of the batch.
    """

    NOISE_BYTES_PER_ROW = 1 << 20

    def __init__(self, seeds: Sequence[int], params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.noise: torch.Tensor | None = None  # (B, block, V) Gumbel noise, used one token at a time
        self.used = 0

    def _next_noise(self, vocab: int) -> torch.Tensor:
        if self.noise is None or self.used == self.noise.shape[1]:
            block = max(1, min(self.params.max_new_tokens, self.NOISE_BYTES_PER_ROW // (4 * vocab)))
            uniform = torch.stack(
                [torch.rand(block, vocab, generator=g, device=self.device) for g in self.generators]
            )
            # Clamped away from 0 and 1, where -log(-log u) is infinite.
            uniform = uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0 - 1e-7)
            self.noise, self.used = -torch.log(-torch.log(uniform)), 0
        self.used += 1
        return self.noise[:, self.used - 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"sampling: {scores.shape[0]} rows for {len(self.generators)} seeds")
        if self.params.top_k:
            kth = torch.topk(scores, min(self.params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        logprobs = sampling_logprobs(scores, self.params.temperature, self.params.top_p)
        return logprobs + self._next_noise(scores.shape[-1]).to(scores.device)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    batch_size: int = 64,
    max_prompt_tokens: int | None = None,
    seeds: Sequence[int] | None = None,
) -> Samples:
    """Sample one completion per prompt, ``batch_size`` prompts per ``generate`` call.

    Without ``seeds`` it uses the global torch RNG, so callers seed it (per step and rank) for
    reproducible rollouts. With one seed per prompt each row samples from its own stream
    (`RowSeededSampling`): the same seeds give the same completions whatever the batching or
    the number of processes. ``max_prompt_tokens`` keeps the prompt's last tokens: the end of
    a prompt is what the completion continues.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"sampling: {len(seeds)} seeds for {len(prompts)} prompts")
    if tokenizer.pad_token_id is None:
        raise ValueError("sampling: the tokenizer has no pad token; set one when building the model")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            prompt_ids, prompt_mask = _encode_left_padded(tokenizer, chunk, max_prompt_tokens)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            how: dict[str, Any] = params.generate_kwargs()
            if seeds is not None and params.temperature > 0:
                rows = seeds[start : start + batch_size]
                noise = LogitsProcessorList([RowSeededSampling(rows, params, device)])
                how = {"do_sample": False, "logits_processor": noise}
            output = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **how,
            )
            completion_ids = output[:, prompt_ids.shape[1] :]
            mask = completion_mask(completion_ids, tokenizer.eos_token_id)
            completion_ids = torch.where(
                mask > 0, completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id)
            )
            parts.append(
                Samples(
                    prompts=chunk,
                    completions=_decode(tokenizer, completion_ids, mask),
                    prompt_ids=prompt_ids,
                    prompt_mask=prompt_mask,
                    completion_ids=completion_ids,
                    completion_mask=mask,
                )
            )
    finally:
        model.train(was_training)
    return concat_samples(parts, pad_token_id=tokenizer.pad_token_id)


def encode_prompt(tokenizer: Any, prompt: str, *, max_prompt_tokens: int | None = None) -> list[int]:
    """``[bos] prompt`` exactly as `data.encode_prompt_completion` starts a training sequence.

    Sampling from the same prefix the SFT, reward and DPO stages trained on keeps the
    completions in-distribution and lets a reward model score them token for token.
    """
    ids = data.with_bos(tokenizer, data.encode_text(tokenizer, prompt))
    if max_prompt_tokens is not None:
        ids = ids[-max_prompt_tokens:]
    if not ids:
        raise ValueError(f"sampling: prompt {prompt!r} encodes to no tokens")
    return ids


def _encode_left_padded(
    tokenizer: Any, prompts: list[str], max_prompt_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [encode_prompt(tokenizer, prompt, max_prompt_tokens=max_prompt_tokens) for prompt in prompts]
    width = max(len(row) for row in rows)
    pad = int(tokenizer.pad_token_id)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


def _decode(tokenizer: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    lengths = mask.sum(dim=1).tolist()
    return [
        tokenizer.decode(row[: int(length)].tolist(), skip_special_tokens=True)
        for row, length in zip(completion_ids, lengths, strict=True)
    ]
