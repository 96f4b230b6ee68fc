"""GRPO stage: group-relative policy optimisation against verifiable rewards (Shao et al. 2024).

No value model and, with ``kl_coef: 0``, no reference: the baseline of each completion's reward
is the other completions of the same prompt. Each step:

1. rollout: ``prompts_per_step`` prompts per process, each answered ``group_size`` (G) times by
   the current policy (batched KV-cache sampling, as ppo and generate do);
2. reward: the weighted sum of the verifiers (``verifiers: {exact_match: 1.0, math: 0.5}``,
   scored against each row's ``answer``; see `kubealign_jobs.verifiers`) and, with
   ``inputs.rewardModel``, ``reward_model_weight`` times the reward model's score;
3. advantages: reward minus the group's mean (``advantage: grpo``) or the mean of the other
   G - 1 (``rloo``), divided by the group's standard deviation unless ``scale_rewards: false``;
   a group whose rewards are all equal has zero advantage and teaches nothing;
4. ``epochs`` passes over the rollout (in ``mini_batch_size`` chunks, one optimizer step each):
   the clipped surrogate per token, plus ``kl_coef`` times the k3 estimate of KL to the
   reference, averaged over each completion's tokens, then over completions.

With one pass of one chunk (the defaults) the policy that sampled is the policy being updated,
so the ratio is exactly 1 and no separate old-policy forward pass is made.

Data: rows ``{prompt | question | messages, answer}``; ``answer`` (a string or a number) is
required by the verifiers that compare with it (exact_match, math, a regex with ``{answer}``).

    python -m kubealign_jobs.grpo --config stage.json
    torchrun --nproc_per_node 2 -m kubealign_jobs.grpo --config stage.json   # data-parallel

A process keeps its groups whole, so advantages never need another process's rewards, and each
completion is sampled from its own seeded stream (`sampling.RowSeededSampling`): N processes
with ``prompts_per_step`` p train as one process with N x p (with one update chunk). The
artifact is the policy as a plain ``save_pretrained`` model; checkpoints resume with step,
optimizer, schedule, RNG and data position. With ``inputs.evalData`` (rows like ``data``) the
greedy answers to its prompts are scored before training and after: ``eval_reward_initial``
(the starting policy, e.g. SFT) and ``eval_reward``; with verifiers alone, accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, loop, rl, runtime, scorers, verifiers
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.config import ConfigError, derive_seed
from kubealign_jobs.runtime import StageContext
from kubealign_jobs.sampling import Samples, SamplingParams, completion_logits, sample
from kubealign_jobs.stages import GRPOHyperparameters as Hyperparameters


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str | None


def read_prompt(row: data.Row, chat_format: data.ChatFormatter, *, needs_answer: bool) -> Prompt:
    """A row's prompt (as the policy sees it) and its reference answer."""
    answer = row.fields.get("answer")
    if answer is None and needs_answer:
        raise data.DataError(f"{row.where('answer')}: missing; the verifiers score against it")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        raise data.DataError(f"{row.where('answer')}: expected a string or a number, got {answer!r}")
    return Prompt(data.prompt_text(row, chat_format), None if answer is None else str(answer))


RewardFn = Callable[[Samples, Sequence[Prompt]], torch.Tensor]


def make_reward(hp: Hyperparameters, reward_model: scorers.Scorer | None) -> RewardFn:
    """The stage's reward: weighted verifiers plus the weighted reward model, per completion."""
    verify = verifiers.combined(hp.verifiers, pattern=hp.regex) if hp.verifiers else None

    def reward(samples: Samples, prompts: Sequence[Prompt]) -> torch.Tensor:
        total = torch.zeros(len(samples))
        if verify is not None:
            total += torch.tensor(verify(samples.completions, [p.answer or "" for p in prompts]))
        if reward_model is not None:
            scores = scorers.score_tensor(reward_model, samples.prompts, samples.completions)
            total += hp.reward_model_weight * scores
        return total

    return reward


# ---------------------------------------------------------------------------- rollouts


@dataclass(frozen=True)
class Rollout:
    """N = prompts x G completions, group by group. Sequences (N, P + C), the rest (N, C) or (N,)."""

    completions: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor  # float, 1 on real completion tokens
    old_logprobs: torch.Tensor | None  # None: the update's first pass is the sampling policy itself
    ref_logprobs: torch.Tensor | None  # None: kl_coef is 0
    rewards: torch.Tensor
    advantages: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _logprobs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, hp: Hyperparameters
) -> torch.Tensor:
    """Per-token log-probs (B, C) of ``targets`` at the sampling temperature."""
    logits = completion_logits(model, ids, mask, targets.shape[1]).logits / hp.temperature
    return models.logps_from_logits(logits, targets)


@torch.no_grad()
def collect_rollout(
    *,
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    hp: Hyperparameters,
    needs_old: bool,
    seeds: Sequence[int],
) -> Rollout:
    """Steps 1-3 of the module docstring for this process's prompts; ``seeds`` has one seed
    per completion (prompt by prompt, G each), its own sampling stream."""
    repeated = [p for p in prompts for _ in range(hp.group_size)]
    samples = sample(
        policy,
        tokenizer,
        [p.text for p in repeated],
        SamplingParams(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p),
        batch_size=hp.forward_batch_size,
        max_prompt_tokens=hp.max_prompt_tokens,
        seeds=seeds,
    )
    ids, attention, targets = samples.input_ids, samples.attention_mask, samples.completion_ids
    mask = samples.completion_mask.float()

    def score(model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        parts = [
            _logprobs(model, ids[rows], attention[rows], targets[rows], hp)
            for rows in (
                slice(s, s + hp.forward_batch_size) for s in range(0, len(samples), hp.forward_batch_size)
            )
        ]
        model.train(was_training)
        return torch.cat(parts) * mask

    rewards = reward_fn(samples, repeated)
    return Rollout(
        completions=samples.completions,
        input_ids=ids,
        attention_mask=attention,
        completion_ids=targets,
        mask=mask,
        old_logprobs=score(policy) if needs_old else None,
        ref_logprobs=score(reference) if reference is not None else None,
        rewards=rewards,
        advantages=rl.group_advantages(rewards, hp.group_size, method=hp.advantage, scale=hp.scale_rewards),
    )


# ---------------------------------------------------------------------------- the update


def grpo_update(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    hp: Hyperparameters,
    generator: torch.Generator,
    backward: Callable[[torch.Tensor], None],
    clip_grad_norm: Callable[[float], torch.Tensor],
) -> dict[str, float]:
    """Step 4: ``epochs`` passes of clipped-surrogate SGD over one rollout; mean statistics."""
    model.train()
    size = hp.mini_batch_size or len(rollout)
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(hp.epochs):
        order = (
            torch.randperm(len(rollout), generator=generator)
            if size < len(rollout)
            else torch.arange(len(rollout))
        )
        for start in range(0, len(rollout), size):
            rows = order[start : start + size]
            logprobs = _logprobs(
                model, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.completion_ids[rows], hp
            )
            old = rollout.old_logprobs[rows] if rollout.old_logprobs is not None else logprobs.detach()
            loss, stats = rl.grpo_loss(
                logprobs,
                old,
                rollout.advantages[rows],
                rollout.mask[rows],
                clip_range=hp.clip_range,
                ref_logprobs=None if rollout.ref_logprobs is None else rollout.ref_logprobs[rows],
                kl_coef=hp.kl_coef,
            )
            backward(loss)
            # grad_clip 0 disables clipping: an infinite max norm still measures the norm.
            grad_norm = clip_grad_norm(hp.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **stats}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            updates += 1
    scheduler.step()
    return {name: value / max(updates, 1) for name, value in totals.items()}


# ---------------------------------------------------------------------------- held-out reward


@torch.no_grad()
def held_out_reward(
    ctx: StageContext,
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    *,
    hp: Hyperparameters,
) -> float:
    """The mean reward of greedy answers to held-out prompts (each rank answers its share):
    the verifiers' accuracy when they are the reward."""
    mine = list(prompts[ctx.rank :: ctx.world_size])
    total = 0.0
    if mine:
        was_training = policy.training
        policy.eval()
        samples = sample(
            policy,
            tokenizer,
            [p.text for p in mine],
            SamplingParams(max_new_tokens=hp.max_new_tokens, temperature=0.0),
            batch_size=hp.forward_batch_size,
            max_prompt_tokens=hp.max_prompt_tokens,
        )
        policy.train(was_training)
        total = float(reward_fn(samples, mine).sum())
    sums = ctx.sum_across_ranks({"reward": total, "n": float(len(mine))})
    return sums["reward"] / max(sums["n"], 1.0)


# ---------------------------------------------------------------------------- the stage


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    """The GRPO stage; `runtime.run_stage` handles config, launch, errors and the termination message."""
    config = ctx.config
    model_uri = loop.require_input(config.inputs.model, "inputs.model")
    data_uri = loop.require_input(config.inputs.data, "inputs.data")
    if not hp.verifiers and not config.inputs.reward_model:
        raise ConfigError(
            "hyperparameters.verifiers: a grpo stage needs verifiers, inputs.rewardModel, or both"
        )
    world = ctx.world_size
    accelerator = ctx.accelerator

    policy_dir = loop.fetch_model(ctx, model_uri, "policy")
    tokenizer = models.load_tokenizer(policy_dir)
    chat_format = data.tokenizer_chat_format(tokenizer)
    # Only a verifier that compares with the row's answer needs one.
    needs_answer = bool({"exact_match", "math"} & set(hp.verifiers)) or "{answer}" in (hp.regex or "")
    prompts = data.load(
        data_uri,
        ctx.scratch / "data",
        lambda row: read_prompt(row, chat_format, needs_answer=needs_answer),
    )
    # With kl_coef 0 the reference is never read: it is not even loaded.
    reference = None
    if hp.kl_coef:
        reference_uri = config.inputs.reference or model_uri
        reference_dir = (
            policy_dir if reference_uri == model_uri else loop.fetch_model(ctx, reference_uri, "reference")
        )
        reference = (
            use_fast_masks(models.load_causal_lm(reference_dir)).to(ctx.device).eval().requires_grad_(False)
        )
    reward_model = None
    if config.inputs.reward_model:
        reward_model = scorers.load_reward_model_scorer(
            config.inputs.reward_model,
            ctx.scratch,
            device=ctx.device,
            batch_size=hp.forward_batch_size,
            max_length=hp.reward_max_length,
        )
    reward_fn = make_reward(hp, reward_model)
    held_out = (
        data.load(
            config.inputs.eval_data,
            ctx.scratch / "eval_data",
            lambda row: read_prompt(row, chat_format, needs_answer=needs_answer),
        )
        if config.inputs.eval_data
        else []
    )
    sampler = data.EpochSampler(len(prompts), hp.prompts_per_step * world, seed=config.seed)

    resume = loop.find_resume_checkpoint(ctx)
    policy = use_fast_masks(models.load_causal_lm(resume.model_dir if resume else policy_dir))
    # The ratio pi / pi_old must be exactly 1 before the first update; dropout would make it noise.
    models.disable_dropout(policy)
    policy.to(ctx.device)
    optimizer = loop.make_optimizer(policy, hp)
    scheduler = loop.make_scheduler(optimizer, hp, hp.steps)
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    step, position = 0, data.DataPosition()
    unwrapped: nn.Module = accelerator.unwrap_model(wrapped)
    # The starting policy's held-out reward, measured once and kept in every checkpoint.
    initial: float | None = None
    if resume is not None:
        restored = loop.restore_training_state(
            ctx, resume, optimizer=optimizer, scheduler=scheduler, total=hp.steps
        )
        step, position = restored.step, restored.position
        initial = restored.state.get("eval_reward_initial")
    elif held_out:
        with accelerator.autocast():
            initial = held_out_reward(ctx, unwrapped, tokenizer, held_out, reward_fn, hp=hp)
        ctx.emit({"event": "held_out", "step": 0, "eval_reward": initial})

    def write_model(dest: Path) -> None:
        models.save_pretrained(accelerator.unwrap_model(wrapped), tokenizer, dest)

    params = [p for p in wrapped.parameters() if p.requires_grad]
    needs_old = hp.epochs > 1 or (0 < hp.mini_batch_size < hp.prompts_per_step * hp.group_size)
    last: dict[str, float] = {}
    progress = loop.Progress(ctx, total=hp.steps, log_every=hp.log_every, examples=len(prompts))
    while step < hp.steps:
        mine, position, seed = loop.rollout_prompts(ctx, sampler, position, prompts, step=step)
        # Completion g of the prompt at position i of the step's global batch has its own seed,
        # so a rollout does not depend on how many processes split it.
        positions = data.shard_positions(sampler.batch_size, rank=ctx.rank, world_size=world)
        sample_seeds = [derive_seed(config.seed, step, i, g) for i in positions for g in range(hp.group_size)]
        # The reference sees the same autocast as the policy: precision alone must not show as KL.
        with accelerator.autocast():
            rollout = collect_rollout(
                policy=unwrapped,
                reference=reference,
                tokenizer=tokenizer,
                prompts=mine,
                reward_fn=reward_fn,
                hp=hp,
                needs_old=needs_old,
                seeds=sample_seeds,
            )
        stats = grpo_update(
            model=wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            rollout=rollout,
            hp=hp,
            generator=torch.Generator().manual_seed(seed),
            backward=accelerator.backward,
            clip_grad_norm=lambda max_norm: accelerator.clip_grad_norm_(params, max_norm),
        )
        groups = rollout.rewards.view(-1, hp.group_size)
        n = len(rollout)
        sums = {
            "reward": float(rollout.rewards.sum()),
            "reward_std": float(groups.std(dim=1).sum()) * hp.group_size,
            "zero_std_fraction": float((groups.std(dim=1) == 0).sum()) * hp.group_size,
            "completion_length": float(rollout.mask.sum()),
            **{name: value * n for name, value in stats.items()},
        }
        means = {name: value / (n * world) for name, value in ctx.sum_across_ranks(sums).items()}
        step += 1
        last = means
        progress.step_done(step, last, lr=scheduler.get_last_lr()[0], position=position)
        if hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < hp.steps:
            loop.save_training_state(
                ctx,
                step=step,
                optimizer=optimizer,
                scheduler=scheduler,
                position=position,
                write_model=write_model,
                hp=hp,
                extra_state={"eval_reward_initial": initial},
            )

    metrics: dict[str, Any] = {"steps": step, **last}
    if held_out:
        with accelerator.autocast():
            metrics["eval_reward"] = held_out_reward(ctx, unwrapped, tokenizer, held_out, reward_fn, hp=hp)
        metrics["eval_reward_initial"] = initial
        metrics["eval_prompts"] = len(held_out)
    runtime.publish_results(ctx, metrics, write_model, steps=step)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.run_stage("grpo", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
