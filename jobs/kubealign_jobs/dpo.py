"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

    python -m kubealign_jobs.dpo --config stage.json

    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

``loss_type`` picks another member of the family (`kubealign_jobs.losses`): ``robust``,
``ipo``, ``hinge``, or ``simpo``, which is reference-free: no reference is loaded, scored or
cached, and ``gamma`` is its target margin. ``label_smoothing`` gives conservative (sigmoid) or
robust DPO.

Inputs: ``model`` (the SFT policy to start from), ``reference`` (the frozen reference policy;
defaults to ``model``), ``data`` (rows ``{prompt | question, chosen, rejected}``), optional
``eval_data``.

Speed without approximation:
- The reference never changes, so its log-probs are computed once, before training, in
  inference mode and length-sorted batches, and stored under ``<output>/reference_logps/``
  with a manifest and a fingerprint of the reference weights and the tokenised data. A retry
  (or a resumed run) reuses them; training then holds one model, not two.
- Chosen and rejected answers go through the policy in one concatenated forward pass.
- The LM head and log-softmax run only on positions that predict completion tokens
  (`model.CompletionLogps`), never on prompt or padding positions.

Output: ``<output>/artifact`` (the policy + tokenizer), ``<output>/metrics.json`` with the
loss, implicit-reward accuracy and margins (held-out ones too when ``eval_data`` is given).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from kubealign_jobs import checkpoint as checkpoints
from kubealign_jobs import data, loop, parallel, storage
from kubealign_jobs import model as models
from kubealign_jobs.config import ConfigError
from kubealign_jobs.losses import dpo_loss, simpo_loss
from kubealign_jobs.runtime import StageContext, publish_results, run_stage
from kubealign_jobs.stages import DPOHyperparameters as Hyperparameters
from kubealign_jobs.stages import ReferenceHyperparameters

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference_logps"
REFERENCE_FILE = "logps.pt"
PAIR_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


@dataclass(frozen=True)
class PairExample:
    """One tokenised preference pair with its reference log-probs."""

    chosen: data.Encoded
    rejected: data.Encoded
    ref_chosen: float
    ref_rejected: float


@dataclass(frozen=True)
class PairBatch:
    """B pairs as one (2B, T) batch, chosen rows first, and the (B,) reference log-probs."""

    sequences: data.CompletionBatch
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.sequences.to(device),
            self.ref_chosen.to(device, non_blocking=True),
            self.ref_rejected.to(device, non_blocking=True),
        )


def collate_pairs(examples: Sequence[PairExample], *, pad_token_id: int) -> PairBatch:
    sequences = [e.chosen for e in examples] + [e.rejected for e in examples]
    return PairBatch(
        sequences=data.collate(sequences, pad_token_id=pad_token_id),
        ref_chosen=torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32),
        ref_rejected=torch.tensor([e.ref_rejected for e in examples], dtype=torch.float32),
    )


def pair_loss(model: nn.Module, batch: PairBatch, *, hp: Hyperparameters) -> loop.LossOutput:
    """The ``loss_type`` loss of a batch of pairs from one forward pass over chosen and rejected together."""
    seq = batch.sequences
    logps = models.sequence_logps(model, seq.input_ids, seq.attention_mask, seq.completion_mask)  # (2B,)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_tokens, rejected_tokens = seq.completion_mask.sum(dim=1).chunk(2)
    if hp.loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen_logps / chosen_tokens.clamp(min=1),
            rejected_logps / rejected_tokens.clamp(min=1),
            hp.beta,
            hp.gamma,
        )
    else:
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            batch.ref_chosen,
            batch.ref_rejected,
            hp.beta,
            loss_type=hp.loss_type,
            label_smoothing=hp.label_smoothing,
            lengths=(chosen_tokens, rejected_tokens),
        )
    return loop.LossOutput(
        loss_sum=losses.sum(),
        metric_sums={
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "chosen_reward": chosen_rewards.sum(),
            "rejected_reward": rejected_rewards.sum(),
        },
    )


# ---------------------------------------------------------------------------- reference log-probs


def fingerprint(
    reference_uri: str,
    pairs: Sequence[data.EncodedRanking],
    *,
    split: str,
    precision: str,
    device: str,
) -> str:
    """Identity of a reference computation: the reference weights, every tokenised sequence, and
    the precision and device it ran with (bf16 log-probs, or a GPU's, differ from fp32 CPU ones)."""
    digest = hashlib.sha256()
    manifest = storage.read_manifest_quiet(reference_uri)
    weights = [f.sha256 for f in manifest.files] if manifest else [reference_uri]
    identity = {"reference": weights, "split": split, "precision": precision, "device": device}
    digest.update(json.dumps(identity).encode())
    for pair in pairs:
        for seq in pair.sequences:
            digest.update(json.dumps([seq.prompt_length, seq.ids]).encode())
    return digest.hexdigest()


def compute_sequence_logps(
    ctx: StageContext,
    reference: nn.Module,
    sequences: Sequence[data.Encoded],
    *,
    pad_token_id: int,
    batch_size: int,
    lockstep: bool = False,
) -> torch.Tensor:
    """log pi_ref of every sequence (N,), each rank scoring a share, in length-sorted batches.

    ``lockstep``: the reference is sharded, so every rank runs the same number of forward passes.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
    mine: list[int] = []
    values: list[float] = []
    for chunk, counts in parallel.lockstep_batches(
        order, rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size, lockstep=lockstep
    ):
        batch = data.collate([sequences[i] for i in chunk], pad_token_id=pad_token_id).to(ctx.device)
        with parallel.no_grad(sharded=lockstep), ctx.accelerator.autocast():
            logps = models.sequence_logps(
                reference, batch.input_ids, batch.attention_mask, batch.completion_mask
            )
        if counts:
            mine.extend(chunk)
            values.extend(logps.float().cpu().tolist())
    result = torch.empty(len(sequences), dtype=torch.float32)
    for indices, scores in ctx.gather((mine, values)):
        result[indices] = torch.tensor(scores, dtype=torch.float32)
    return result


def reference_logps(
    ctx: StageContext,
    hp: ReferenceHyperparameters,
    splits: dict[str, list[data.EncodedRanking]],
    *,
    reference_uri: str,
    pad_token_id: int,
    policy: parallel.Trainable | None = None,
) -> dict[str, torch.Tensor]:
    """(N, 2) chosen/rejected reference log-probs per split: reused when stored, else computed and stored.

    ``policy``: the policy before training, when it computes the reference itself: with LoRA
    its base (adapters off) is the reference, and a sharded policy is not loaded twice.
    """
    uri = storage.join(ctx.config.output, REFERENCE_DIR)
    prints = {
        name: fingerprint(
            reference_uri, pairs, split=name, precision=hp.mixed_precision, device=ctx.device.type
        )
        for name, pairs in splits.items()
    }
    manifest = storage.read_manifest_quiet(uri)
    if manifest is not None and manifest.metadata.get("fingerprints") == prints:
        try:
            local = storage.fetch_dir(uri, ctx.scratch / REFERENCE_DIR, require_manifest=True)
            stored: dict[str, torch.Tensor] = torch.load(local / REFERENCE_FILE, weights_only=True)
            ctx.emit({"event": "reference_logps", "source": uri})
            return stored
        except storage.StorageError as exc:
            log.warning("recomputing reference log-probs: %s", exc)
    elif manifest is not None:
        log.warning("stored reference log-probs at %s are for other data or weights; recomputing", uri)

    lockstep = hp.sharding == "fsdp"
    with contextlib.ExitStack() as scope:
        if policy is not None:
            reference = policy.module
            if policy.adapters is not None:
                scope.enter_context(policy.reference())
        else:
            ref_dir = loop.fetch_model(ctx, reference_uri, "reference")
            ref_lm = models.load_causal_lm(ref_dir)
            reference = models.CompletionLogps(ref_lm)
            if lockstep:  # a model that needs sharding to train needs it to score as well
                parallel.shard(ctx, reference, ref_lm, hp, hp.mixed_precision)
            else:
                reference.to(ctx.device)
        was_training = reference.training
        reference.eval()
        batch_size = hp.reference_batch_size or 4 * loop.micro_batch_size(hp, ctx.world_size)
        result = {}
        for name, pairs in splits.items():
            flat = [seq for pair in pairs for seq in pair.sequences]  # chosen, rejected, chosen, ...
            scores = compute_sequence_logps(
                ctx, reference, flat, pad_token_id=pad_token_id, batch_size=batch_size, lockstep=lockstep
            )
            result[name] = scores.view(-1, 2)
        reference.train(was_training)
    del reference
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if ctx.is_main:
        local = ctx.scratch / REFERENCE_DIR
        local.mkdir(parents=True, exist_ok=True)
        torch.save(result, local / REFERENCE_FILE)
        storage.publish_dir(local, uri, metadata={"fingerprints": prints}, overwrite=True)
    ctx.barrier()
    ctx.emit({"event": "reference_logps", "computed": {k: int(v.shape[0]) for k, v in result.items()}})
    return result


def attach(pairs: Sequence[data.EncodedRanking], logps: torch.Tensor) -> list[PairExample]:
    values = logps.tolist()
    return [
        PairExample(chosen=p.sequences[0], rejected=p.sequences[1], ref_chosen=v[0], ref_rejected=v[1])
        for p, v in zip(pairs, values, strict=True)
    ]


@dataclass(frozen=True)
class Policy:
    """A policy trained against cached reference log-probs, laid out for training."""

    resume: checkpoints.Checkpoint | None
    tokenizer: Any
    trainable: parallel.Trainable
    # The policy computes the reference itself when it is the reference (same input, weights
    # not yet trained): its base under LoRA, itself when sharded (no second sharded copy).
    own_reference: bool

    @property
    def reference_model(self) -> parallel.Trainable | None:
        """What `reference_logps` scores with instead of loading a reference, or None."""
        return self.trainable if self.own_reference else None


def load_policy(
    ctx: StageContext, hp: ReferenceHyperparameters, *, model_uri: str, reference_uri: str
) -> Policy:
    """The starting (or resumed) policy of dpo and kto, its tokenizer, and whether it is its own reference."""
    resume = loop.find_resume_checkpoint(ctx)
    model_dir = loop.starting_weights(ctx, resume, model_uri, hp, pairs=True)
    tokenizer = models.load_tokenizer(model_dir)
    lm = models.load_causal_lm(model_dir, empty=parallel.weights_from_rank0(ctx, hp))
    if hp.disable_dropout:
        models.disable_dropout(lm)
    trainable = parallel.prepare(ctx, hp, lm, wrap=models.CompletionLogps, pairs=True)
    scores_itself = trainable.adapters is not None or (trainable.sharded and resume is None)
    return Policy(resume, tokenizer, trainable, own_reference=reference_uri == model_uri and scores_itself)


def evaluate_pairs(
    ctx: StageContext,
    model: nn.Module,
    examples: list[PairExample],
    *,
    hp: Hyperparameters,
    pad_token_id: int,
) -> dict[str, float]:
    """Held-out DPO loss, reward accuracy and margins, each rank scoring its share."""
    size = loop.micro_batch_size(hp, ctx.world_size)
    sums: dict[str, float] = {"loss": 0.0, "examples": 0.0}
    for chunk, counts in parallel.lockstep_batches(
        examples, rank=ctx.rank, world_size=ctx.world_size, batch_size=size, lockstep=hp.sharding == "fsdp"
    ):
        batch = collate_pairs(chunk, pad_token_id=pad_token_id).to(ctx.device)
        with ctx.accelerator.autocast():
            out = pair_loss(model, batch, hp=hp)
        if not counts:
            continue
        sums["loss"] += float(out.loss_sum)
        sums["examples"] += float(batch.ref_chosen.shape[0])
        for name, value in out.metric_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    totals = ctx.sum_across_ranks({k: sums.get(k, 0.0) for k in ("loss", "examples", *PAIR_METRICS)})
    count = max(totals.pop("examples"), 1.0)
    return {f"eval_{name}": value / count for name, value in totals.items()}


# ---------------------------------------------------------------------------- the stage


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    inputs = ctx.config.inputs
    model_uri = loop.require_input(inputs.model, "inputs.model")
    data_uri = loop.require_input(inputs.data, "inputs.data")
    reference_uri = inputs.reference or model_uri
    if hp.loss_type == "simpo" and inputs.reference:
        raise ConfigError("inputs.reference: loss_type simpo uses no reference; remove it")

    policy = load_policy(ctx, hp, model_uri=model_uri, reference_uri=reference_uri)
    tokenizer = policy.tokenizer
    pad_token_id = int(tokenizer.pad_token_id)

    parse = partial(data.preference_example, chat_format=data.tokenizer_chat_format(tokenizer))
    splits = {"train": data.load(data_uri, ctx.scratch / "data", parse)}
    if inputs.eval_data:
        splits["eval"] = data.load(inputs.eval_data, ctx.scratch / "eval_data", parse)
    encoded = {
        name: data.encode_preferences(tokenizer, rows, max_length=hp.max_length)
        for name, rows in splits.items()
    }
    if hp.loss_type == "simpo":
        # Reference-free: nothing is loaded, computed or cached; the pairs carry zeros.
        ref = {name: torch.zeros(len(pairs), 2) for name, pairs in encoded.items()}
    else:
        ref = reference_logps(
            ctx,
            hp,
            encoded,
            reference_uri=reference_uri,
            pad_token_id=pad_token_id,
            policy=policy.reference_model,
        )
    train_pairs = attach(encoded["train"], ref["train"])

    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    if "eval" in encoded:
        eval_pairs = attach(encoded["eval"], ref["eval"])

        def evaluate(model: nn.Module) -> dict[str, float]:
            return evaluate_pairs(ctx, model, eval_pairs, hp=hp, pad_token_id=pad_token_id)

    task: loop.Task[PairExample, PairBatch] = loop.Task(
        examples=train_pairs,
        collate=partial(collate_pairs, pad_token_id=pad_token_id),
        to_device=PairBatch.to,
        units=lambda batch: int(batch.ref_chosen.shape[0]),
        loss=partial(pair_loss, hp=hp),
        tokens=lambda batch: batch.sequences.num_tokens,
    )
    result = loop.train(
        ctx,
        hp,
        model=policy.trainable,
        task=task,
        tokenizer=tokenizer,
        resume=policy.resume,
        evaluate=evaluate,
        extra_state={"beta": hp.beta, "loss_type": hp.loss_type},
    )
    metrics = {**result.metrics, "pairs": float(len(train_pairs)), "beta": hp.beta, "loss_type": hp.loss_type}
    publish_results(
        ctx,
        metrics,
        policy.trainable.writer(tokenizer),
        steps=result.steps,
        reference=None if hp.loss_type == "simpo" else reference_uri,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("dpo", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
