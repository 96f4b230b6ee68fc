"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired answers labelled good or bad.

    python -m kubealign_jobs.kto --config stage.json

With ``r = log pi(y|x) - log ref(y|x)`` and ``z`` the reference point (below):

    L = w_d (1 - sigmoid(beta (r - z)))   for a desirable answer (label true)
        w_u (1 - sigmoid(beta (z - r)))   for an undesirable one (label false)

Inputs: ``model`` (the policy to start from), ``reference`` (defaults to ``model``), ``data``
(rows ``{prompt | question, completion, label}`` with ``label`` a boolean). No pairs are needed:
this is the loss for thumbs-up / thumbs-down data.

The reference point ``z`` estimates KL(pi || ref) without a gradient: the batch mean of the same
log-ratio on mismatched answers, each prompt with another row's answer (clamped at 0, as in the
paper and TRL). Each row is given its mismatched answer once, by a seeded derangement, so the
reference log-probs of both sequences are computed once before training and cached with a
fingerprint, as the dpo stage does; training then holds one model, and the matched and
mismatched sequences go through the policy in one forward pass.

Output: ``<output>/artifact`` (the policy + tokenizer), ``<output>/metrics.json`` with the loss,
``kl`` (the reference point) and ``label_reward`` (the implicit reward ``beta * r``, signed by
the label: it rises as desirable answers gain and undesirable ones lose).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, dpo, loop
from kubealign_jobs import model as models
from kubealign_jobs.losses import kto_loss
from kubealign_jobs.runtime import StageContext, publish_results, run_stage
from kubealign_jobs.stages import KTOHyperparameters as Hyperparameters


@dataclass(frozen=True)
class LabelledExample:
    prompt: str
    completion: str
    desirable: bool


def labelled_example(
    row: data.Row, chat_format: data.ChatFormatter = data.default_chat_format
) -> LabelledExample:
    """One KTO row: a prompt, an answer, and whether the answer is desirable."""
    example = data.sft_example(row, chat_format)
    label = row.fields.get("label")
    if label is None:
        raise data.DataError(f"{row.where('label')}: missing (true for a desirable answer, false otherwise)")
    if not isinstance(label, bool):
        raise data.DataError(f"{row.where('label')}: expected true or false, got {label!r}")
    return LabelledExample(example.prompt, example.completion, label)


def mismatched_partners(count: int, seed: int) -> list[int]:
    """For each row, another row whose answer it is paired with: a seeded derangement (a cycle)."""
    if count < 2:
        raise data.DataError(f"KTO needs at least 2 rows to estimate its reference point, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * count
    for position, row in enumerate(order):
        partner[row] = order[(position + 1) % count]
    return partner


@dataclass(frozen=True)
class KTOExample:
    """A row's own sequence and its mismatched one, with their reference log-probs, and its label."""

    pair: dpo.PairExample  # chosen: the row's own answer; rejected: the mismatched answer
    desirable: bool


@dataclass(frozen=True)
class KTOBatch:
    pairs: dpo.PairBatch
    desirable: torch.Tensor  # (B,) bool

    def to(self, device: torch.device) -> KTOBatch:
        return KTOBatch(self.pairs.to(device), self.desirable.to(device, non_blocking=True))


def collate(examples: Sequence[KTOExample], *, pad_token_id: int) -> KTOBatch:
    return KTOBatch(
        pairs=dpo.collate_pairs([e.pair for e in examples], pad_token_id=pad_token_id),
        desirable=torch.tensor([e.desirable for e in examples], dtype=torch.bool),
    )


def batch_loss(model: nn.Module, batch: KTOBatch, *, hp: Hyperparameters) -> loop.LossOutput:
    """KTO loss of a batch from one forward pass over the rows' own and mismatched sequences."""
    seq = batch.pairs.sequences
    logps = models.sequence_logps(model, seq.input_ids, seq.attention_mask, seq.completion_mask)
    own, mismatched = logps.chunk(2)
    kl = (mismatched - batch.pairs.ref_rejected).mean().detach().clamp(min=0)
    losses, rewards = kto_loss(
        own,
        batch.pairs.ref_chosen,
        batch.desirable,
        kl,
        hp.beta,
        desirable_weight=hp.desirable_weight,
        undesirable_weight=hp.undesirable_weight,
    )
    sign = batch.desirable.float() * 2 - 1
    return loop.LossOutput(
        loss_sum=losses.sum(),
        metric_sums={"kl": kl * losses.shape[0], "label_reward": (sign * rewards).sum()},
    )


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    inputs = ctx.config.inputs
    model_uri = loop.require_input(inputs.model, "inputs.model")
    data_uri = loop.require_input(inputs.data, "inputs.data")
    reference_uri = inputs.reference or model_uri

    policy = dpo.load_policy(ctx, hp, model_uri=model_uri, reference_uri=reference_uri)
    tokenizer = policy.tokenizer
    pad_token_id = int(tokenizer.pad_token_id)

    parse = partial(labelled_example, chat_format=data.tokenizer_chat_format(tokenizer))
    rows = data.load(data_uri, ctx.scratch / "data", parse)
    partners = mismatched_partners(len(rows), ctx.config.seed)
    encode = partial(data.encode_prompt_completion, tokenizer, max_length=hp.max_length)
    encoded = [
        data.EncodedRanking(
            sequences=(encode(row.prompt, row.completion), encode(row.prompt, rows[j].completion))
        )
        for row, j in zip(rows, partners, strict=True)
    ]
    ref = dpo.reference_logps(
        ctx,
        hp,
        {"train": encoded},
        reference_uri=reference_uri,
        pad_token_id=pad_token_id,
        policy=policy.reference_model,
    )
    examples = [
        KTOExample(pair, row.desirable)
        for pair, row in zip(dpo.attach(encoded, ref["train"]), rows, strict=True)
    ]
    task: loop.Task[KTOExample, KTOBatch] = loop.Task(
        examples=examples,
        collate=partial(collate, pad_token_id=pad_token_id),
        to_device=KTOBatch.to,
        units=lambda batch: int(batch.desirable.shape[0]),
        loss=partial(batch_loss, hp=hp),
        tokens=lambda batch: batch.pairs.sequences.num_tokens,
    )
    result = loop.train(
        ctx,
        hp,
        model=policy.trainable,
        task=task,
        tokenizer=tokenizer,
        resume=policy.resume,
        extra_state={"beta": hp.beta},
    )
    desirable = sum(row.desirable for row in rows)
    metrics = {
        **result.metrics,
        "examples": float(len(rows)),
        "desirable": float(desirable),
        "undesirable": float(len(rows) - desirable),
        "beta": hp.beta,
    }
    publish_results(
        ctx, metrics, policy.trainable.writer(tokenizer), steps=result.steps, reference=reference_uri
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("kto", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
