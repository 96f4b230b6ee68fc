"""Reward model: a scalar head on the LM, fitted to human preferences.

    python -m kubealign_jobs.reward --config stage.json

Pairs ``{prompt, chosen, rejected}`` are fitted with the Bradley-Terry loss
``-log sigmoid(r(x, y_w) - r(x, y_l))``; rankings ``{prompt, responses: [best, ..., worst]}``
with its generalisation to K answers, Plackett-Luce. Both may be mixed in one dataset (a pair
is a ranking of two, and for two answers the losses coincide).

Inputs: ``model`` (the backbone, usually the SFT model; a new scalar head is initialised),
``data``, optional ``eval_data`` (otherwise ``eval_fraction`` of ``data`` is held out).

Output: ``<output>/artifact``, a sequence classifier with one label that plain transformers
loads with ``AutoModelForSequenceClassification``; its score is read at the last non-pad
token. ``metrics.json`` reports the held-out preference accuracy (the fraction of ordered
pairs of answers the model ranks correctly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, loop, parallel
from kubealign_jobs import model as models
from kubealign_jobs.losses import bradley_terry_loss, plackett_luce_losses, ranking_agreement
from kubealign_jobs.runtime import StageContext, publish_results, run_stage
from kubealign_jobs.stages import RewardHyperparameters as Hyperparameters


@dataclass(frozen=True)
class RankingBatch:
    """B rankings: every answer of every ranking as one batch, and where each one's score goes.

    sequences: (N, T) all answers, N = total answers in the batch
    positions: (B, K) index into the N scores (best first); 0 where ``valid`` is False
    valid:     (B, K) which entries are real answers (rankings may have different K)
    """

    sequences: data.CompletionBatch
    positions: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device) -> RankingBatch:
        return RankingBatch(
            self.sequences.to(device), self.positions.to(device, non_blocking=True), self.valid.to(device)
        )


def collate_rankings(examples: Sequence[data.EncodedRanking], *, pad_token_id: int) -> RankingBatch:
    width = max(len(e.sequences) for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    valid = torch.zeros((len(examples), width), dtype=torch.bool)
    flat: list[data.Encoded] = []
    for row, example in enumerate(examples):
        for column, sequence in enumerate(example.sequences):
            positions[row, column] = len(flat)
            valid[row, column] = True
            flat.append(sequence)
    return RankingBatch(data.collate(flat, pad_token_id=pad_token_id), positions, valid)


def ranking_scores(model: nn.Module, batch: RankingBatch) -> torch.Tensor:
    """(B, K) reward of every answer, best first; entries past a ranking's end are 0."""
    seq = batch.sequences
    scores = models.reward_scores(model, seq.input_ids, seq.attention_mask)  # (N,)
    return scores[batch.positions].masked_fill(~batch.valid, 0.0)


def ranking_loss(model: nn.Module, batch: RankingBatch) -> loop.LossOutput:
    scores = ranking_scores(model, batch)
    size = scores.shape[0]
    if scores.shape[1] == 2 and bool(batch.valid.all()):
        loss_sum = bradley_terry_loss(scores[:, 0], scores[:, 1]) * size
    else:
        loss_sum = plackett_luce_losses(scores, batch.valid).sum()
    return loop.LossOutput(loss_sum=loss_sum, metric_sums=ranking_metrics(scores.detach(), batch.valid))


def ranking_metrics(scores: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example sums: pairwise accuracy and the margin between best and worst answer."""
    k = scores.shape[1]
    better_first = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)
    pair_valid = valid.unsqueeze(2) & valid.unsqueeze(1) & better_first  # (B, K, K): i ranked above j
    correct = ((scores.unsqueeze(2) > scores.unsqueeze(1)) & pair_valid).sum(dim=(1, 2))
    accuracy = correct / pair_valid.sum(dim=(1, 2)).clamp(min=1)
    worst = scores.gather(1, (valid.sum(dim=1) - 1).unsqueeze(1)).squeeze(1)
    return {"accuracy": accuracy.sum(), "reward_margin": (scores[:, 0] - worst).sum()}


def evaluate_rankings(
    ctx: StageContext,
    model: nn.Module,
    examples: Sequence[data.EncodedRanking],
    *,
    pad_token_id: int,
    size: int,
    lockstep: bool = False,
) -> dict[str, float]:
    """Held-out loss, pairwise preference accuracy and margin, each rank scoring its share.

    ``lockstep``: the model is sharded, so every rank runs the same number of forward passes.
    """
    sums = {"loss": 0.0, "correct_pairs": 0.0, "pairs": 0.0, "margin": 0.0, "examples": 0.0}
    for chunk, counts in parallel.lockstep_batches(
        list(examples), rank=ctx.rank, world_size=ctx.world_size, batch_size=size, lockstep=lockstep
    ):
        batch = collate_rankings(chunk, pad_token_id=pad_token_id).to(ctx.device)
        with ctx.accelerator.autocast():
            scores = ranking_scores(model, batch)
        if not counts:
            continue
        correct, total = ranking_agreement(scores, batch.valid)
        last = batch.valid.sum(dim=1) - 1
        sums["loss"] += float(plackett_luce_losses(scores, batch.valid).sum())
        sums["correct_pairs"] += float(correct)
        sums["pairs"] += float(total)
        sums["margin"] += float((scores[:, 0] - scores.gather(1, last.unsqueeze(1)).squeeze(1)).sum())
        sums["examples"] += float(scores.shape[0])
    totals = ctx.sum_across_ranks(sums)
    examples_count = max(totals["examples"], 1.0)
    return {
        "eval_loss": totals["loss"] / examples_count,
        "eval_accuracy": totals["correct_pairs"] / max(totals["pairs"], 1.0),
        "eval_reward_margin": totals["margin"] / examples_count,
        "eval_examples": totals["examples"],
    }


def split_held_out(
    rows: list[data.RankedExample], *, fraction: float, seed: int
) -> tuple[list[data.RankedExample], list[data.RankedExample]]:
    """A deterministic (seeded) train/held-out split by prompt; every rank computes the same one.

    All the pairs of a prompt land on the same side: held-out accuracy then measures how the
    model ranks answers to prompts it never saw, not answers it saw beside their siblings.
    ``fraction`` is of the prompts.
    """
    prompts = list(dict.fromkeys(row.prompt for row in rows))
    if fraction <= 0 or len(prompts) < 2:
        return rows, []
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {prompts[i] for i in order[: max(1, int(len(prompts) * fraction))]}
    return [r for r in rows if r.prompt not in held], [r for r in rows if r.prompt in held]


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    inputs = ctx.config.inputs
    model_uri = loop.require_input(inputs.model, "inputs.model")
    data_uri = loop.require_input(inputs.data, "inputs.data")

    resume = loop.find_resume_checkpoint(ctx)
    model_dir = loop.starting_weights(ctx, resume, model_uri, hp)
    tokenizer = models.load_tokenizer(model_dir)
    pad_token_id = int(tokenizer.pad_token_id)
    reward_model = models.load_reward_model(
        model_dir, tokenizer=tokenizer, empty=parallel.weights_from_rank0(ctx, hp)
    )
    if hp.disable_dropout:
        models.disable_dropout(reward_model)
    # The wrapper runs the last layer on the scored token only; the classifier is what is saved.
    # Under LoRA the scalar head trains in full beside the adapters.
    trainable = parallel.prepare(ctx, hp, reward_model, wrap=models.LastTokenReward, head="score")

    parse = partial(data.ranked_example, chat_format=data.tokenizer_chat_format(tokenizer))
    rows = data.load(data_uri, ctx.scratch / "data", parse)
    if inputs.eval_data:
        held_out = data.load(inputs.eval_data, ctx.scratch / "eval_data", parse)
    else:
        rows, held_out = split_held_out(rows, fraction=hp.eval_fraction, seed=ctx.config.seed)

    encoded = data.encode_rankings(tokenizer, rows, max_length=hp.max_length)
    eval_encoded = data.encode_rankings(tokenizer, held_out, max_length=hp.max_length)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    if eval_encoded:
        size = loop.micro_batch_size(hp, ctx.world_size)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return evaluate_rankings(
                ctx, model, eval_encoded, pad_token_id=pad_token_id, size=size, lockstep=trainable.sharded
            )

    task: loop.Task[data.EncodedRanking, RankingBatch] = loop.Task(
        examples=encoded,
        collate=partial(collate_rankings, pad_token_id=pad_token_id),
        to_device=RankingBatch.to,
        units=lambda batch: int(batch.valid.shape[0]),
        loss=ranking_loss,
        tokens=lambda batch: batch.sequences.num_tokens,
    )
    result = loop.train(
        ctx,
        hp,
        model=trainable,
        task=task,
        tokenizer=tokenizer,
        resume=resume,
        evaluate=evaluate,
    )
    metrics = {**result.metrics, "examples": float(len(encoded))}
    publish_results(ctx, metrics, trainable.writer(tokenizer), steps=result.steps)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("reward", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
