"""The training loop every training stage shares: batches, accumulation, checkpoints, resume, logging.

A stage describes its task (examples, how to collate them, the loss of a micro-batch) and
this loop does the rest, the same way for pretrain, sft, reward and dpo:

    for step in start+1 .. total_steps:
        global batch of example indices  <- EpochSampler at the saved DataPosition
        this rank's share, split into micro-batches; backward on each (DDP syncs on the last)
        loss normalised by the global count of loss units (tokens or examples) in the step,
        so 1 process and N processes, with or without accumulation, take the same step
        clip, optimizer step, LR schedule; log every `log_every`; checkpoint every `checkpoint_every`

Resuming restores the model, optimizer, scheduler, RNG and data position of the newest
complete checkpoint, so the step count continues and no example is drawn twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from kubealign_jobs import checkpoint as checkpoints
from kubealign_jobs import hub, parallel, storage
from kubealign_jobs import model as models
from kubealign_jobs.config import ConfigError, derive_seed
from kubealign_jobs.data import DataPosition, EpochSampler, shard
from kubealign_jobs.parallel import Trainable
from kubealign_jobs.runtime import StageContext, StoppedError
from kubealign_jobs.stages import CheckpointHyperparameters, OptimizerHyperparameters, TrainingHyperparameters

log = logging.getLogger(__name__)

E = TypeVar("E")
B = TypeVar("B")


@dataclass(frozen=True)
class LossOutput:
    """The loss of one micro-batch.

    loss_sum:    sum of the per-unit losses (units: tokens or examples), carrying gradients
    metric_sums: per-example sums of things to report (detached), averaged over the step's examples
    """

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Task(Generic[E, B]):
    """What a stage trains on and how.

    examples:   the whole (tokenised) training set, indexed by the sampler
    collate:    a micro-batch of examples -> a batch on the CPU
    to_device:  moves a batch to the training device
    units:      how many loss units (tokens or examples) a batch holds, to normalise the loss
    loss:       (model, batch) -> LossOutput
    tokens:     how many real (not padding) tokens a batch feeds the model: progress records then
                carry ``tokens_per_s``, over every process
    """

    examples: Sequence[E]
    collate: Callable[[Sequence[E]], B]
    to_device: Callable[[B, torch.device], B]
    units: Callable[[B], int]
    loss: Callable[[nn.Module, B], LossOutput]
    tokens: Callable[[B], int] | None = None


@dataclass(frozen=True)
class TrainResult:
    steps: int
    metrics: dict[str, float]


def total_steps(hp: TrainingHyperparameters, steps_per_epoch: int) -> int:
    if hp.max_steps:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * steps_per_epoch))


def micro_batch_size(hp: TrainingHyperparameters, world_size: int) -> int:
    if hp.batch_size % world_size:
        raise ConfigError(
            f"hyperparameters.batch_size: {hp.batch_size} is not divisible by the {world_size} processes"
        )
    per_rank = hp.batch_size // world_size
    size = hp.micro_batch_size or per_rank
    if per_rank % size:
        raise ConfigError(
            f"hyperparameters.micro_batch_size: {size} does not divide the per-process batch of {per_rank}"
        )
    return size


def lr_factor(step: int, *, hp: OptimizerHyperparameters, total: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps: warmup, then decay."""
    if hp.warmup_steps and step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    if hp.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
    linear = 1.0 - progress
    shape = linear if hp.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * shape


def make_optimizer(model: nn.Module, hp: OptimizerHyperparameters) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CUDA and CPU) updates all parameters in one pass: ~3x faster than the
    # per-tensor loop on a small model, where the optimizer step is a visible share of the step.
    fused = all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)
    return torch.optim.AdamW(
        groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), fused=fused or None
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, hp: OptimizerHyperparameters, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then the ``lr_schedule`` decay over ``total`` optimizer steps (see `lr_factor`).

    The scheduler stays outside accelerate: its wrapper would step it once per process.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, hp=hp, total=total))


# ---------------------------------------------------------------------------- inputs


def require_input(value: str | None, field: str) -> str:
    if not value:
        raise ConfigError(f"{field}: required for this stage")
    return value


def fetch_model(ctx: StageContext, uri: str, name: str = "model") -> Path:
    """Fetch a save_pretrained folder once per node (verified when it has a manifest).

    ``hf://org/name[@revision]`` comes from the hub (`hub.fetch`). A ``.gguf`` file is fetched
    and then converted into a save_pretrained folder, once per node by its first process, so
    everything downstream loads the same kind of folder.
    """
    from_hub = (lambda _dest: hub.fetch(uri)) if hub.is_hub_uri(uri) else None
    local = ctx.fetch_shared(uri, f"inputs/{name}", fetch=from_hub)
    if local.suffix != models.GGUF_SUFFIX:
        return local
    folder = ctx.node_scratch / "inputs" / f"{name}-from-gguf"
    if ctx.is_local_main and not folder.is_dir():
        models.gguf_to_pretrained(local, folder)
    ctx.barrier()
    return folder


def starting_weights(
    ctx: StageContext, resume: checkpoints.Checkpoint | None, model_uri: str, hp: Any, *, pairs: bool = False
) -> Path:
    """The folder to load the model from: a full checkpoint's, else the stage's input model.

    A distributed checkpoint stores only what trains (all weights under FSDP, the adapters
    under LoRA), so its model is rebuilt from the input and `train` loads the shards over it.
    On a GPU, a model that plainly cannot fit fails here, from its config.json, before loading.
    """
    folder = (
        resume.model_dir if resume is not None and not resume.distributed else fetch_model(ctx, model_uri)
    )
    if ctx.device.type == "cuda":
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((folder / "config.json").read_text())
            parallel.estimate_memory(ctx, hp, config, pairs=pairs)
    return folder


# ---------------------------------------------------------------------------- resume


def find_resume_checkpoint(ctx: StageContext) -> checkpoints.Checkpoint | None:
    """The newest good checkpoint of this stage, agreed by all ranks and fetched once per node.

    Rank 0 chooses (skipping damaged checkpoints); the first process of every other node
    fetches and verifies that one; the rest read the node's copy.
    """
    resume_dir = ctx.node_scratch / "resume"
    found = checkpoints.latest_checkpoint(ctx.config.checkpoints, resume_dir) if ctx.is_main else None
    chosen = ctx.broadcast(found.uri if found else None)
    if chosen is None:
        return None
    if ctx.is_local_main and found is None:
        found = checkpoints.load_checkpoint(chosen, resume_dir)
    ctx.barrier()
    return found or checkpoints.open_checkpoint(chosen, resume_dir)


@dataclass(frozen=True)
class Restored:
    """Where a resumed stage continues: its step, data position and the checkpoint's whole state."""

    step: int
    position: DataPosition
    state: dict[str, Any]


def restore_training_state(
    ctx: StageContext,
    resume: checkpoints.Checkpoint,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    total: int,
) -> Restored:
    """Load optimizer, scheduler and this rank's RNG from ``resume``; the step and data position.

    The model's weights come from ``resume.model_dir`` before this is called; a stage's own extra
    state (a KL controller, a data fingerprint) is in ``Restored.state``.
    """
    state = resume.state
    if not resume.distributed:  # a distributed checkpoint's optimizer state is in its shards
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state.get("rng", [])
    if ctx.rank < len(rng_states):
        checkpoints.restore_rng_state(rng_states[ctx.rank])
    restored = Restored(
        step=int(state["step"]), position=DataPosition.from_dict(state["data_position"]), state=state
    )
    ctx.emit({"event": "resumed", "step": restored.step, "total_steps": total, "checkpoint": resume.uri})
    return restored


def save_training_state(
    ctx: StageContext,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: DataPosition,
    write_model: Callable[[Path], object],
    hp: CheckpointHyperparameters,
    extra_state: dict[str, Any] | None = None,
    write_shards: Callable[[Path], object] | None = None,
) -> None:
    """A resumable checkpoint at ``step``: every rank's RNG, rank 0 writes (manifest last).

    With ``write_shards(dest)`` (collective: each rank writes its DCP shard of model and
    optimizer) it is a distributed checkpoint: ``write_model`` then writes only config and
    tokenizer, and every rank uploads its own files before rank 0 commits the manifest.
    """
    rng = ctx.gather(checkpoints.capture_rng_state())
    if write_shards is not None:
        _save_distributed_state(
            ctx,
            step=step,
            scheduler=scheduler,
            position=position,
            write_model=write_model,
            write_shards=write_shards,
            hp=hp,
            extra_state={"rng": rng, **(extra_state or {})},
        )
        return
    if ctx.is_main:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_position": position.to_dict(),
            "rng": rng,
            "hyperparameters": asdict(hp),
            "config": ctx.config.to_dict(),
            **(extra_state or {}),
        }
        uri = checkpoints.save_checkpoint(
            checkpoints_uri=ctx.config.checkpoints,
            step=step,
            write_model=write_model,
            state=state,
            scratch=ctx.scratch / "checkpoint",
            keep_last=hp.keep_checkpoints,
        )
        ctx.emit({"event": "checkpoint", "step": step, "uri": uri})
    ctx.barrier()


def load_shards(
    model: Trainable, wrapped: nn.Module, optimizer: torch.optim.Optimizer, resume: checkpoints.Checkpoint
) -> None:
    """Load a distributed checkpoint's shards into ``model`` (from `parallel.prepare`) and ``optimizer``.

    A full checkpoint's weights were loaded with the model; the two kinds do not mix, since a
    distributed one holds only what trains.
    """
    if resume.distributed != model.distributed_checkpoints:
        kind = "distributed (sharded or LoRA)" if resume.distributed else "full"
        raise ConfigError(
            f"hyperparameters.sharding: {resume.uri} is a {kind} checkpoint; resume with the "
            "sharding and lora settings it was written with"
        )
    if resume.dcp_dir is not None:
        parallel.load_distributed(model, wrapped, optimizer, resume.dcp_dir)


def save_trainable_state(
    ctx: StageContext,
    model: Trainable,
    wrapped: nn.Module,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: DataPosition,
    write_model: Callable[[Path], object],
    tokenizer: Any,
    hp: CheckpointHyperparameters,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """`save_training_state` for a model from `parallel.prepare`: its DCP shards when it has no
    whole copy anywhere (sharded, or only adapters train), else ``write_model``'s full folder."""
    distributed = model.distributed_checkpoints
    save_training_state(
        ctx,
        step=step,
        optimizer=optimizer,
        scheduler=scheduler,
        position=position,
        write_model=partial(model.write_config, tokenizer) if distributed else write_model,
        hp=hp,
        extra_state=extra_state,
        write_shards=partial(parallel.save_distributed, model, wrapped, optimizer) if distributed else None,
    )


def _save_distributed_state(
    ctx: StageContext,
    *,
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: DataPosition,
    write_model: Callable[[Path], object],
    write_shards: Callable[[Path], object],
    hp: CheckpointHyperparameters,
    extra_state: dict[str, Any],
) -> None:
    uri = checkpoints.step_uri(ctx.config.checkpoints, step)
    # Rank 0 clears what is there and the writers share one token. A complete checkpoint at
    # this step is one this attempt's resume skipped as unusable (see `save_checkpoint`).
    decision = None
    if ctx.is_main:
        if storage.is_complete(uri):
            log.warning("checkpoint %s: replacing the one an earlier attempt left (resume skipped it)", uri)
        decision = storage.begin_parts(uri)
    token = ctx.broadcast(decision)
    local = ctx.scratch / "checkpoint" / f"{checkpoints.STEP_PREFIX}{step:08d}"
    shutil.rmtree(local, ignore_errors=True)
    try:
        write_shards(local / checkpoints.DCP_DIR)
        if ctx.is_main:
            write_model(local / checkpoints.MODEL_DIR)
            state = {
                "format": checkpoints.DCP_DIR,
                "world_size": ctx.world_size,
                "scheduler": scheduler.state_dict(),
                "data_position": position.to_dict(),
                "hyperparameters": asdict(hp),
                "config": ctx.config.to_dict(),
                **extra_state,
                "step": step,
            }
            torch.save(state, local / checkpoints.STATE_FILE)
        entries = storage.upload_part(local, uri, token)
        everyone = [entry for part in ctx.gather(entries) for entry in part]
        if ctx.is_main:
            storage.commit_parts(uri, everyone, token, metadata={"step": step, "format": checkpoints.DCP_DIR})
            checkpoints.prune_checkpoints(ctx.config.checkpoints, keep_last=hp.keep_checkpoints)
            ctx.emit({"event": "checkpoint", "step": step, "uri": uri, "shards": ctx.world_size})
    finally:
        shutil.rmtree(local, ignore_errors=True)
    ctx.barrier()


# ---------------------------------------------------------------------------- the loop


def train(
    ctx: StageContext,
    hp: TrainingHyperparameters,
    *,
    model: Trainable,
    task: Task[E, B],
    tokenizer: Any,
    resume: checkpoints.Checkpoint | None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (from `parallel.prepare`) on ``task``; return the steps and final metrics.

    ``model`` must already hold the weights to start from: a full checkpoint's when resuming
    from one; the stage's input when resuming from a distributed checkpoint, whose shards are
    loaded here. Checkpoints hold ``tokenizer`` beside the model. ``extra_state`` is stored
    in every checkpoint (e.g. a fingerprint of the data).
    """
    accelerator = ctx.accelerator
    world = ctx.world_size
    micro = micro_batch_size(hp, world)
    sampler = EpochSampler(len(task.examples), hp.batch_size, seed=ctx.config.seed)
    total = total_steps(hp, sampler.steps_per_epoch)

    model.reshard()
    optimizer = make_optimizer(model.module, hp)
    scheduler = make_scheduler(optimizer, hp, total)
    # FSDP already split the model; everything else goes through accelerate (DDP, autocast).
    wrapped = model.module
    if not model.sharded:
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    wrapped.train()

    step = 0
    position = DataPosition()
    if resume is not None:
        load_shards(model, wrapped, optimizer, resume)
        restored = restore_training_state(ctx, resume, optimizer=optimizer, scheduler=scheduler, total=total)
        step, position, state = restored.step, restored.position, restored.state
        if state.get("num_examples") != len(task.examples) or state.get("batch_size") != hp.batch_size:
            log.warning(
                "checkpoint was written for %s examples in batches of %s; now %d in batches of %d",
                state.get("num_examples"),
                state.get("batch_size"),
                len(task.examples),
                hp.batch_size,
            )

    def save(at_step: int) -> None:
        save_trainable_state(
            ctx,
            model,
            wrapped,
            step=at_step,
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            write_model=partial(models.save_pretrained, model.lm, tokenizer),
            tokenizer=tokenizer,
            hp=hp,
            extra_state={
                "num_examples": len(task.examples),
                "batch_size": hp.batch_size,
                **(extra_state or {}),
            },
        )

    device = ctx.device
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_metrics: dict[str, torch.Tensor] = {}
    window_units = 0
    window_examples = 0
    window_tokens = 0
    window_start = time.perf_counter()
    window_steps = 0
    last_logged: dict[str, float] = {}
    params = [p for p in wrapped.parameters() if p.requires_grad]

    stop = StopSignal()
    try:
        while step < total:
            indices, position = sampler.next_batch(position)
            mine = [task.examples[i] for i in shard(indices, rank=ctx.rank, world_size=world)]
            batches = [task.collate(mine[start : start + micro]) for start in range(0, len(mine), micro)]
            units = sum(task.units(b) for b in batches)
            if task.tokens is not None:
                window_tokens += sum(task.tokens(b) for b in batches)
            global_units = int(ctx.sum_across_ranks({"units": units})["units"]) if world > 1 else units
            # DDP averages gradients over processes; multiplying by `world` turns that into a sum,
            # so the step's gradient is exactly d(sum of losses)/d(theta) / (global units).
            scale = world / max(global_units, 1)
            for index, batch in enumerate(batches):
                sync = index == len(batches) - 1
                model.set_gradient_sync(sync)
                with contextlib.nullcontext() if sync or model.sharded else accelerator.no_sync(wrapped):
                    out = task.loss(wrapped, task.to_device(batch, device))
                    accelerator.backward(out.loss_sum * scale)
                window_loss += out.loss_sum.detach().double()
                for name, value in out.metric_sums.items():
                    window_metrics[name] = window_metrics.get(name, 0) + value.detach().double()
            grad_norm = clip_gradients(model, params, hp.grad_clip, accelerator) if hp.grad_clip > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_units += global_units
            window_examples += hp.batch_size
            window_steps += 1

            if step % hp.log_every == 0 or step == total:
                sums = {"loss": float(window_loss), **{k: float(v) for k, v in window_metrics.items()}}
                sums = ctx.sum_across_ranks({**sums, "tokens": float(window_tokens)})
                tokens = sums.pop("tokens")
                elapsed = time.perf_counter() - window_start
                last_logged = {
                    "loss": sums.pop("loss") / max(window_units, 1),
                    **{k: v / window_examples for k, v in sums.items()},
                }
                record: dict[str, Any] = {
                    "step": step,
                    "total_steps": total,
                    **last_logged,
                    "lr": scheduler.get_last_lr()[0],
                    "epoch": round(position.epoch + position.index / len(task.examples), 4),
                    "steps_per_s": round(window_steps / elapsed, 3) if elapsed > 0 else None,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if task.tokens is not None and elapsed > 0:
                    record["tokens_per_s"] = round(tokens / elapsed, 1)
                ctx.emit(record)
                window_loss.zero_()
                window_metrics = {}
                window_units = window_examples = window_steps = window_tokens = 0
                window_start = time.perf_counter()

            saved = bool(hp.checkpoint_every) and step % hp.checkpoint_every == 0
            if saved:
                save(step)
            if step < total and stop.requested(ctx):
                # SIGTERM: publish this step (unless just done) and stop; the next pod resumes here.
                if not saved:
                    save(step)
                raise StoppedError(step)
            if evaluate is not None and hp.eval_every and step % hp.eval_every == 0 and step < total:
                ctx.emit({"event": "eval", "step": step, **_evaluate(model, wrapped, evaluate)})

    finally:
        stop.restore()
    final = {f"train_{k}": v for k, v in last_logged.items()}
    if evaluate is not None:
        eval_metrics = _evaluate(model, wrapped, evaluate)
        ctx.emit({"event": "eval", "step": step, **eval_metrics})
        final.update(eval_metrics)
    final["steps"] = float(step)
    final.update(memory_metrics(model, ctx.device))
    return TrainResult(steps=step, metrics=final)


def memory_metrics(model: Trainable, device: torch.device) -> dict[str, float]:
    """A training stage's memory figures: the estimate `parallel.prepare` made, beside the peak."""
    found = model.memory.metrics() if model.memory is not None else {}
    return {**found, "memory_peak_bytes": float(peak_memory_bytes(device))}


def peak_memory_bytes(device: torch.device) -> int:
    """What the estimate is checked against: this process's peak so far, the CUDA caching
    allocator's peak allocation on a GPU, the resident set (``ru_maxrss``) on CPU. On CPU it also
    counts the interpreter and libraries (~0.7 GiB with torch and transformers) and the C
    allocator's fragmentation, which the estimate leaves out."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class StopSignal:
    """SIGTERM (the pod is being preempted, drained or suspended), seen at a step boundary.

    The handler only sets a flag: the step in flight finishes, then the loop publishes a
    checkpoint of it and stops, inside the pod's terminationGracePeriodSeconds. With several
    processes every rank must stop at the same step (the checkpoint is a collective), so they
    agree through one small all-reduce per step.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum: int, _frame: object) -> None:
        log.warning("SIGTERM: checkpointing at the end of this step, then stopping")
        self._signalled = True

    def requested(self, ctx: StageContext) -> bool:
        if ctx.world_size == 1:
            return self._signalled
        return ctx.sum_across_ranks({"stop": float(self._signalled)})["stop"] > 0

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def clip_gradients(
    model: Trainable, params: Sequence[torch.Tensor], max_norm: float, accelerator: Any
) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm``; return the norm before clipping."""
    if not model.sharded:
        clipped: torch.Tensor = accelerator.clip_grad_norm_(params, max_norm)
        return clipped
    # FSDP gradients are DTensor shards: torch computes the global norm across them.
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _evaluate(
    model: Trainable, wrapped: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]
) -> dict[str, float]:
    wrapped.eval()
    try:
        with parallel.no_grad(sharded=model.sharded):
            return evaluate(wrapped)
    finally:
        model.reshard()
        wrapped.train()


# ---------------------------------------------------------------------------- on-policy stages (ppo, grpo)


def rollout_prompts(
    ctx: StageContext, sampler: EpochSampler, position: DataPosition, items: Sequence[E], *, step: int
) -> tuple[list[E], DataPosition, int]:
    """This rank's share of the next global batch, the position after it, and the step's seed.

    The global RNG is seeded per (step, rank), so a resumed run samples exactly what the
    original would have.
    """
    indices, position = sampler.next_batch(position)
    mine = [items[i] for i in shard(indices, rank=ctx.rank, world_size=ctx.world_size)]
    seed = derive_seed(ctx.config.seed, step, ctx.rank)
    torch.manual_seed(seed)
    return mine, position, seed


class Progress:
    """The progress records of a step loop: one every ``log_every`` steps and one at the last,
    with the steps/s of the window since the previous record."""

    def __init__(self, ctx: StageContext, *, total: int, log_every: int, examples: int) -> None:
        self.ctx, self.total, self.log_every, self.examples = ctx, total, log_every, examples
        self.window_start = time.perf_counter()

    def step_done(self, step: int, metrics: dict[str, float], *, lr: float, position: DataPosition) -> None:
        if step % self.log_every and step != self.total:
            return
        elapsed = time.perf_counter() - self.window_start
        self.ctx.emit(
            {
                "step": step,
                "total_steps": self.total,
                **metrics,
                "lr": lr,
                "epoch": round(position.epoch + position.index / self.examples, 4),
                "steps_per_s": round(self.log_every / elapsed, 4) if elapsed > 0 else None,
            }
        )
        self.window_start = time.perf_counter()
