"""Supervised fine-tuning: maximise the likelihood of the response tokens only.

    python -m kubealign_jobs.sft --config stage.json

Inputs: ``model`` (a save_pretrained folder with its tokenizer), ``data`` (SFT rows:
instruction/input/output, prompt/completion or chat messages), optional ``eval_data``.
With ``preferred_ft`` the data are preference rows and the model is trained on the chosen
answers: the Preferred-FT baseline of the DPO paper.

Output: ``<output>/artifact`` (model + tokenizer), ``<output>/metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, loop, parallel
from kubealign_jobs import model as models
from kubealign_jobs.runtime import StageContext, publish_results, run_stage
from kubealign_jobs.stages import SFTHyperparameters as Hyperparameters
from kubealign_jobs.stages import TrainingHyperparameters


def completion_nll(model: nn.Module, batch: data.CompletionBatch) -> loop.LossOutput:
    """Summed negative log-likelihood of the completion tokens; the loop divides by their count."""
    logps = models.token_logps(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask, batch.position_ids
    )
    return loop.LossOutput(loss_sum=-logps.sum())


def completion_task(
    encoded: list[data.Encoded], tokenizer: Any, hp: TrainingHyperparameters, *, packing: bool = False
) -> loop.Task[data.Encoded, data.CompletionBatch]:
    """Completion NLL over micro-batches, padded or (``packing``) laid end to end in one row."""
    return loop.Task(
        examples=encoded,
        collate=data.collate_packed
        if packing
        else partial(data.collate, pad_token_id=int(tokenizer.pad_token_id)),
        to_device=data.CompletionBatch.to,
        units=lambda batch: batch.num_completion_tokens,
        loss=completion_nll,
        tokens=lambda batch: batch.num_tokens,
    )


def evaluate_nll(
    ctx: StageContext,
    model: nn.Module,
    encoded: list[data.Encoded],
    *,
    pad_token_id: int,
    batch_size: int,
    lockstep: bool = False,
) -> dict[str, float]:
    """Token-level NLL and perplexity of the completions, each rank scoring its share.

    ``lockstep``: the model is sharded, so every rank runs the same number of forward passes.
    """
    total, tokens = 0.0, 0
    for chunk, counts in parallel.lockstep_batches(
        encoded, rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size, lockstep=lockstep
    ):
        batch = data.collate(chunk, pad_token_id=pad_token_id).to(ctx.device)
        nll = float(completion_nll(model, batch).loss_sum)
        if counts:
            total += nll
            tokens += batch.num_completion_tokens
    sums = ctx.sum_across_ranks({"nll": total, "tokens": float(tokens)})
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(torch.exp(torch.tensor(loss)))}


def read_examples(uri: str, ctx: StageContext, hp: Hyperparameters, tokenizer: Any) -> list[data.SFTExample]:
    chat_format = data.tokenizer_chat_format(tokenizer)
    if hp.preferred_ft:
        pairs = data.load(uri, ctx.scratch / "data", lambda row: data.preference_example(row, chat_format))
        return [data.SFTExample(prompt=p.prompt, completion=p.chosen) for p in pairs]
    return data.load(uri, ctx.scratch / "data", lambda row: data.sft_example(row, chat_format))


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    inputs = ctx.config.inputs
    model_uri = loop.require_input(inputs.model, "inputs.model")
    data_uri = loop.require_input(inputs.data, "inputs.data")

    resume = loop.find_resume_checkpoint(ctx)
    model_dir = loop.starting_weights(ctx, resume, model_uri, hp)
    tokenizer = models.load_tokenizer(model_dir)
    lm = models.load_causal_lm(model_dir, empty=parallel.weights_from_rank0(ctx, hp))
    trainable = parallel.prepare(ctx, hp, lm, wrap=models.CompletionLogps)

    encoded = data.encode_sft(
        tokenizer, read_examples(data_uri, ctx, hp, tokenizer), max_length=hp.max_length
    )
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    if inputs.eval_data:
        eval_encoded = data.encode_sft(
            tokenizer, read_examples(inputs.eval_data, ctx, hp, tokenizer), max_length=hp.max_length
        )
        eval_batch = loop.micro_batch_size(hp, ctx.world_size)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return evaluate_nll(
                ctx,
                model,
                eval_encoded,
                pad_token_id=int(tokenizer.pad_token_id),
                batch_size=eval_batch,
                lockstep=trainable.sharded,
            )

    result = loop.train(
        ctx,
        hp,
        model=trainable,
        task=completion_task(encoded, tokenizer, hp, packing=hp.packing),
        tokenizer=tokenizer,
        resume=resume,
        evaluate=evaluate,
    )
    metrics = {**result.metrics, "examples": float(len(encoded))}
    publish_results(ctx, metrics, trainable.writer(tokenizer), steps=result.steps)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
