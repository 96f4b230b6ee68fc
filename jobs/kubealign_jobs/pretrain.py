"""Pretraining: next-token prediction on a text corpus, packed into fixed-length blocks.

    python -m kubealign_jobs.pretrain --config stage.json

Inputs: ``data`` (``.txt`` lines, or ``{"text"}`` rows in JSONL/Parquet), optional
``eval_data``, optional ``model`` to continue training. Without a model, a byte-level BPE
tokenizer of ``vocab_size`` is trained on the corpus (by rank 0, then shared with the other
ranks) and a new model is built from ``hyperparameters.model``, e.g.
``{"arch": "llama", "hidden_size": 256, "num_hidden_layers": 4, ...}`` or ``{"arch": "gpt2", ...}``.

Output: ``<output>/artifact`` (model + tokenizer), ``<output>/metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, loop, parallel
from kubealign_jobs import model as models
from kubealign_jobs.config import ConfigError
from kubealign_jobs.runtime import StageContext, publish_results, run_stage
from kubealign_jobs.stages import PretrainHyperparameters as Hyperparameters


def document_positions(blocks: torch.Tensor, start_token: int) -> torch.Tensor:
    """(B, T) position ids that restart at 0 on every ``start_token`` (each document's bos).

    Handed to the model with no attention mask, they keep attention inside each document of a
    packed block (see `data.collate_packed`); a block's first tokens, the tail of a document that
    began in the previous block, count up from 0 too.
    """
    index = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks)
    starts = torch.where(blocks == start_token, index, torch.zeros_like(index))
    return index - starts.cummax(dim=1).values


def causal_lm_loss(
    model: nn.Module, blocks: torch.Tensor, *, start_token: int | None = None
) -> loop.LossOutput:
    """Summed NLL of every token after the first of each block (B, T).

    ``start_token``: attention stays inside the documents that begin with it.
    """
    ones = torch.ones_like(blocks)
    positions = None if start_token is None else document_positions(blocks, start_token)
    logps = models.token_logps(model, blocks, ones, ones, positions)
    return loop.LossOutput(loss_sum=-logps.sum())


def stack_blocks(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(blocks))


def evaluate_blocks(
    ctx: StageContext,
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    size: int,
    lockstep: bool = False,
    start_token: int | None = None,
) -> dict[str, float]:
    """Held-out loss and perplexity; ``lockstep``: a sharded model, same forward count on every rank."""
    total, count = 0.0, 0
    for chunk, counts in parallel.lockstep_batches(
        list(range(blocks.shape[0])),
        rank=ctx.rank,
        world_size=ctx.world_size,
        batch_size=size,
        lockstep=lockstep,
    ):
        with ctx.accelerator.autocast():
            nll = float(causal_lm_loss(model, blocks[chunk].to(ctx.device), start_token=start_token).loss_sum)
        if counts:
            total += nll
            count += len(chunk)
    sums = ctx.sum_across_ranks({"nll": total, "tokens": float(count * (blocks.shape[1] - 1))})
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(torch.exp(torch.tensor(loss)))}


def document_start(tokenizer: Any) -> int:
    """The token every packed document starts with (`data.pack_texts` puts bos first)."""
    if tokenizer.bos_token_id is None:
        raise ConfigError(
            "hyperparameters.document_attention: the tokenizer has no bos token to find documents by"
        )
    return int(tokenizer.bos_token_id)


def shared_tokenizer(ctx: StageContext, texts: list[str], hp: Hyperparameters) -> Any:
    """Train the tokenizer once (rank 0) and give every rank the identical one."""
    serialised = None
    if ctx.is_main:
        trained = models.train_tokenizer(
            texts, vocab_size=hp.vocab_size, min_frequency=hp.tokenizer_min_frequency
        )
        serialised = trained.backend_tokenizer.to_str()
    return models.tokenizer_from_json(ctx.broadcast(serialised))


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    inputs = ctx.config.inputs
    data_uri = loop.require_input(inputs.data, "inputs.data")
    texts = data.load(data_uri, ctx.scratch / "data", data.text_of)

    resume = loop.find_resume_checkpoint(ctx)
    if resume is not None and resume.distributed and not inputs.model:
        # A new model's distributed checkpoint: its tokenizer and config, the weights from its shards.
        tokenizer = models.load_tokenizer(resume.model_dir)
        lm = models.build_causal_lm(hp.model, tokenizer=tokenizer)
    elif resume is not None or inputs.model:
        model_dir = loop.starting_weights(ctx, resume, inputs.model or "", hp)
        tokenizer = models.load_tokenizer(model_dir)
        lm = models.load_causal_lm(model_dir, empty=parallel.weights_from_rank0(ctx, hp))
    else:
        tokenizer = shared_tokenizer(ctx, texts, hp)
        lm = models.build_causal_lm(hp.model, tokenizer=tokenizer)
    ctx.emit({"event": "model", "parameters": models.count_parameters(lm), "vocab_size": len(tokenizer)})
    trainable = parallel.prepare(ctx, hp, lm)

    blocks = data.pack_texts(tokenizer, texts, block_size=hp.block_size)
    start_token = document_start(tokenizer) if hp.document_attention else None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    if inputs.eval_data:
        eval_texts = data.load(inputs.eval_data, ctx.scratch / "eval_data", data.text_of)
        eval_blocks = data.pack_texts(tokenizer, eval_texts, block_size=hp.block_size)
        size = loop.micro_batch_size(hp, ctx.world_size)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return evaluate_blocks(
                ctx, model, eval_blocks, size=size, lockstep=hp.sharding == "fsdp", start_token=start_token
            )

    task: loop.Task[torch.Tensor, torch.Tensor] = loop.Task(
        examples=blocks,  # type: ignore[arg-type]  # a (N, T) tensor is a sequence of (T,) blocks
        collate=stack_blocks,
        to_device=lambda batch, device: batch.to(device, non_blocking=True),
        units=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
        loss=partial(causal_lm_loss, start_token=start_token),
        tokens=lambda batch: int(batch.numel()),
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
    metrics = {**result.metrics, "blocks": float(blocks.shape[0]), "tokens": float(blocks.numel())}
    publish_results(ctx, metrics, trainable.writer(tokenizer), steps=result.steps)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
