"""PPO stage: optimise a policy against a reward under a KL penalty to a frozen reference.

The RLHF half of the DPO paper's comparison (Ziegler et al. 2019; Stiennon et al. 2020).
Each step:

1. rollout: sample one completion per prompt from the current policy (KV-cache generation);
   one forward pass of the policy gives log pi and the value estimates (a small head on the
   policy's last hidden state), one of the frozen reference gives log pi_ref;
2. reward: the sequence score from a reward-model stage (``inputs.reward_model``) or a named
   ground-truth scorer (``hyperparameters.scorer``), added at the last completion token to
   the per-token KL penalty ``-beta * (log pi - log pi_ref)``;
3. GAE advantages (whitened) and returns;
4. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss + clipped value loss,
   gradient clipping, one optimizer step per minibatch (gradients all-reduced across ranks);
5. beta is fixed, or adapted towards ``target_kl`` (Ziegler et al.'s controller).

Run it:

    python -m kubealign_jobs.ppo --config stage.json
    torchrun --nproc_per_node 2 -m kubealign_jobs.ppo --config stage.json   # data-parallel

``sharding: fsdp`` shards policy and value head over the processes (and the frozen reference,
which only runs forward); for sampling each process gathers the whole policy for the rollout,
since ranks generate for different numbers of steps. With ``lora`` only the adapters and the
value head train, and the reference is the base with its adapters off: one copy of the weights.

The artifact is the policy as a plain ``save_pretrained`` causal LM (transformers loads it
as any other; merged adapters under LoRA, or the adapter alone with ``lora_merge: false``),
with the value head beside it in ``value_head.safetensors`` (``value_model: separate``: the
critic, a sequence classifier, in ``value_model/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubealign_jobs import data, loop, parallel, rl, runtime, scorers
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.loop import find_resume_checkpoint
from kubealign_jobs.runtime import StageContext
from kubealign_jobs.sampling import Samples, SamplingParams, completion_logits, real_token_positions, sample
from kubealign_jobs.stages import PPOHyperparameters as Hyperparameters

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_MODEL_DIR = "value_model"


class PolicyWithValueHead(nn.Module):
    """A causal LM and a scalar value head on its last hidden state, trained together.

    Sharing the backbone makes the critic nearly free: one forward pass yields both the
    token log-probs and the values, where a separate value model would double the compute.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        hidden_size = int(policy.get_output_embeddings().in_features)  # type: ignore[operator]
        self.value_head = nn.Linear(hidden_size, 1)
        # Values start at exactly zero: the first advantages are the rewards' own GAE, not noise
        # from a random head (a default init gives values of std ~1, as large as the rewards).
        # The weight still learns at once: its gradient is the hidden state, whatever its value.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C, V) predicting the last ``C`` tokens of ``input_ids`` and values (B, C).

        ``values[:, t]`` estimates the return from the state that emits completion token t. Only
        the ``C + 1`` last positions go through the LM head (prompt positions predict nothing
        we train on). Positions count real tokens only, as in generation with left padding.
        """
        output = completion_logits(
            self.policy, input_ids, attention_mask, completion_width, output_hidden_states=True
        )
        hidden = output.hidden_states[-1][:, -completion_width - 1 : -1]  # (B, C, H)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return output.logits, values

    def value_head_state(self) -> dict[str, torch.Tensor]:
        """The head's whole weights on the CPU. Collective under FSDP: its shards are gathered."""
        return {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in self.value_head.state_dict().items()
        }

    def save_value_head(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        save_file(state if state is not None else self.value_head_state(), str(folder / VALUE_HEAD_FILE))

    def load_value_head(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))

    def value_writer(self, trainable: parallel.Trainable, tokenizer: Any) -> Callable[[Path], object]:
        """Writes the value head into an artifact or checkpoint folder. Collective under FSDP."""
        del trainable, tokenizer
        state = self.value_head_state()
        return lambda folder: self.save_value_head(folder, state)


class PolicyWithCritic(nn.Module):
    """A causal LM and a separate critic: a sequence classifier with its own backbone and head.

    InstructGPT's layout (Ouyang et al. 2022) and TRL's: the critic starts from the reward model
    when there is one (its values then start at the reward it predicts), else from the policy's
    weights with a zero head. It costs a second backbone's compute and memory; its gradients
    never touch the policy's features. Under LoRA the critic still trains all its weights.
    """

    def __init__(self, policy: nn.Module, critic: Any) -> None:
        super().__init__()
        self.policy = policy
        self.critic: Any = critic

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `PolicyWithValueHead.forward`: logits (B, C, V) and values (B, C)."""
        logits = completion_logits(self.policy, input_ids, attention_mask, completion_width).logits
        backbone = getattr(self.critic, str(self.critic.base_model_prefix))
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=real_token_positions(attention_mask),
            use_cache=False,
        ).last_hidden_state[:, -completion_width - 1 : -1]
        values = self.critic.score(hidden).squeeze(-1)
        return logits, values

    def value_writer(self, trainable: parallel.Trainable, tokenizer: Any) -> Callable[[Path], object]:
        """Writes the critic as ``value_model/`` (save_pretrained). Collective under FSDP."""
        critic = self.critic
        if not trainable.sharded:
            return lambda folder: models.save_pretrained(critic, tokenizer, folder / VALUE_MODEL_DIR)
        state = trainable.full_state_dict(critic)
        return lambda folder: parallel.save_plain(critic, state, tokenizer, folder / VALUE_MODEL_DIR)


ActorCritic = PolicyWithValueHead | PolicyWithCritic


# ---------------------------------------------------------------------------- rollouts


ScoreFn = Callable[[Samples], torch.Tensor]
# (input_ids, attention_mask, completion width) -> the reference's logits (B, C, V)
ReferenceFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Rollout:
    """One rollout batch and everything the update needs. Sequences (B, P + C), the rest (B, C)."""

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor  # float, 1 on real completion tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,) sequence scores, after any missing-EOS penalty
    kl: torch.Tensor  # (B,) per-sequence KL estimate
    entropy: torch.Tensor  # scalar, mean per-token entropy of the sampling policy

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@torch.no_grad()
def collect_rollout(
    *,
    model: ActorCritic,
    reference: ReferenceFn,
    tokenizer: Any,
    prompts: Sequence[str],
    score_fn: ScoreFn,
    beta: float,
    hp: Hyperparameters,
) -> Rollout:
    """Sample from the current policy and score the samples: steps 1-3 of the module docstring."""
    samples = sample(
        model.policy,
        tokenizer,
        prompts,
        SamplingParams(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p),
        batch_size=hp.forward_batch_size,
        max_prompt_tokens=hp.max_prompt_tokens,
    )
    return score_rollout(
        model=model,
        reference=reference,
        tokenizer=tokenizer,
        samples=samples,
        score_fn=score_fn,
        beta=beta,
        hp=hp,
    )


@torch.no_grad()
def score_rollout(
    *,
    model: ActorCritic,
    reference: ReferenceFn,
    tokenizer: Any,
    samples: Samples,
    score_fn: ScoreFn,
    beta: float,
    hp: Hyperparameters,
) -> Rollout:
    """Steps 1-3 after sampling: log-probs, values, reference log-probs, rewards and advantages."""
    input_ids, attention_mask = samples.input_ids, samples.attention_mask
    completion_ids = samples.completion_ids
    width = completion_ids.shape[1]
    mask = samples.completion_mask.float()
    was_training = model.training
    model.eval()
    logprobs, ref_logprobs, values, entropies = [], [], [], []
    for start in range(0, len(samples), hp.forward_batch_size):
        rows = slice(start, start + hp.forward_batch_size)
        logits, value = model(input_ids[rows], attention_mask[rows], width)
        logits = logits / hp.temperature
        logprobs.append(models.logps_from_logits(logits, completion_ids[rows]))
        entropies.append(rl.entropy_from_logits(logits))
        values.append(value.float())
        ref = reference(input_ids[rows], attention_mask[rows], width) / hp.temperature
        ref_logprobs.append(models.logps_from_logits(ref, completion_ids[rows]))
    model.train(was_training)
    logprob, ref_logprob = torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask
    value = torch.cat(values) * mask

    scores = score_fn(samples).to(logprob.device, torch.float32)
    if hp.missing_eos_penalty is not None and tokenizer.eos_token_id is not None:
        ended = ((completion_ids == tokenizer.eos_token_id) & (samples.completion_mask > 0)).any(dim=1)
        scores = torch.where(ended, scores, scores - hp.missing_eos_penalty)
    rewards, kl = rl.kl_penalized_rewards(
        scores=scores,
        logprobs=logprob,
        ref_logprobs=ref_logprob,
        mask=mask,
        beta=beta,
        estimator=hp.kl_estimator,
    )
    if hp.whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, value, mask, gamma=hp.gamma, lam=hp.lam)
    advantages = rl.whiten(advantages, mask)
    return Rollout(
        prompts=samples.prompts,
        completions=samples.completions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_ids=completion_ids,
        mask=mask,
        logprobs=logprob,
        ref_logprobs=ref_logprob,
        values=value,
        advantages=advantages,
        returns=returns,
        scores=scores,
        kl=kl.sum(dim=1),
        entropy=rl.masked_mean(torch.cat(entropies), mask),
    )


# ---------------------------------------------------------------------------- the update


@dataclass(frozen=True)
class UpdateStats:
    """Means over every minibatch of every PPO epoch of one step."""

    policy_loss: float
    value_loss: float
    clip_fraction: float
    value_clip_fraction: float
    approx_kl: float  # KL(pi_old || pi) estimate between rollout and updated policy
    grad_norm: float


def ppo_update(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    hp: Hyperparameters,
    generator: torch.Generator,
    backward: Callable[[torch.Tensor], None],
    clip_grad_norm: Callable[[float], torch.Tensor],
) -> UpdateStats:
    """``ppo_epochs`` passes of clipped-objective minibatch SGD over one rollout (step 4).

    ``model`` is the (possibly data-parallel wrapped) `PolicyWithValueHead`; ``backward`` and
    ``clip_grad_norm`` come from accelerate, so gradients are all-reduced across ranks.
    """
    model.train()
    width = rollout.completion_ids.shape[1]
    totals = torch.zeros(6)
    updates = 0
    for _ in range(hp.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator)
        for start in range(0, len(rollout), hp.mini_batch_size):
            rows = order[start : start + hp.mini_batch_size]
            mask = rollout.mask[rows]
            logits, values = model(rollout.input_ids[rows], rollout.attention_mask[rows], width)
            logits = logits / hp.temperature
            logprobs = models.logps_from_logits(logits, rollout.completion_ids[rows])
            policy_loss, clip_fraction = rl.clipped_policy_loss(
                logprobs=logprobs,
                old_logprobs=rollout.logprobs[rows],
                advantages=rollout.advantages[rows],
                mask=mask,
                clip_range=hp.clip_range,
            )
            value_loss, value_clip_fraction = rl.clipped_value_loss(
                values=values.float(),
                old_values=rollout.values[rows],
                returns=rollout.returns[rows],
                mask=mask,
                clip_range=hp.clip_range_value,
            )
            loss = policy_loss + hp.value_loss_coef * value_loss
            if hp.entropy_coef:
                loss = loss - hp.entropy_coef * rl.masked_entropy(logits, mask)
            backward(loss)
            # grad_clip 0 disables clipping: an infinite max norm still measures the norm.
            grad_norm = clip_grad_norm(hp.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                log_ratio = logprobs - rollout.logprobs[rows]
                approx_kl = rl.masked_mean(0.5 * log_ratio**2, mask)
                totals += torch.stack(
                    [
                        policy_loss.detach(),
                        value_loss.detach(),
                        clip_fraction,
                        value_clip_fraction,
                        approx_kl,
                        grad_norm.detach().float(),
                    ]
                ).cpu()
            updates += 1
    scheduler.step()
    means = (totals / max(updates, 1)).tolist()
    return UpdateStats(*means)


# ---------------------------------------------------------------------------- the stage


def frozen_reference(
    ctx: StageContext, hp: Hyperparameters, policy: parallel.Trainable, folder: Path | None
) -> ReferenceFn:
    """The KL penalty's reference: the policy's base with adapters off (LoRA, ``folder`` None), or
    the model in ``folder``, frozen, sharded like the policy under FSDP (it only runs forward,
    and every rank runs the same number of its forward passes)."""
    if folder is None:

        def base_logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
            with policy.reference():
                out: torch.Tensor = completion_logits(policy.lm, input_ids, attention_mask, width).logits
            return out

        return base_logits
    empty = parallel.weights_from_rank0(ctx, hp)
    reference = use_fast_masks(models.load_causal_lm(folder, empty=empty)).eval().requires_grad_(False)
    models.disable_dropout(reference)
    if policy.sharded:
        parallel.shard(ctx, reference, reference, hp, hp.mixed_precision)
    else:
        reference.to(ctx.device)

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        out: torch.Tensor = completion_logits(reference, input_ids, attention_mask, width).logits
        return out

    return logits


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    """The PPO stage; `runtime.run_stage` handles config, launch, errors and the termination message."""
    config = ctx.config
    model_uri = loop.require_input(config.inputs.model, "inputs.model")
    data_uri = loop.require_input(config.inputs.data, "inputs.data")
    world = ctx.world_size
    accelerator = ctx.accelerator

    # The policy and its value head: fresh, or from the newest good checkpoint. A distributed
    # checkpoint (sharded, or LoRA) holds only what trains: its shards load over the input.
    resume = find_resume_checkpoint(ctx)
    policy_dir = loop.fetch_model(ctx, model_uri, "policy")
    tokenizer = models.load_tokenizer(policy_dir)
    full_checkpoint = resume is not None and not resume.distributed

    start_dir = resume.model_dir if resume is not None and full_checkpoint else policy_dir
    empty = parallel.weights_from_rank0(ctx, hp)

    def with_critic(lm: nn.Module) -> ActorCritic:
        if hp.value_model == "head":
            model = PolicyWithValueHead(lm)
            if full_checkpoint:
                model.load_value_head(start_dir)
            return model
        if full_checkpoint:
            critic_dir = start_dir / VALUE_MODEL_DIR
        elif config.inputs.reward_model:
            critic_dir = loop.fetch_model(ctx, config.inputs.reward_model, "critic")
        else:
            critic_dir = policy_dir
        critic = use_fast_masks(models.load_reward_model(critic_dir, tokenizer=tokenizer, empty=empty))
        if critic_dir == policy_dir:
            # From a causal LM the head is new: start it at zero, as the shared head starts.
            nn.init.zeros_(critic.score.weight)
        if hp.gradient_checkpointing:
            critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return PolicyWithCritic(lm, critic)

    policy = parallel.prepare(
        ctx, hp, use_fast_masks(models.load_causal_lm(start_dir, empty=empty)), wrap=with_critic
    )
    # PPO's ratio pi/pi_old must be exactly 1 before the first update; dropout would make it
    # noise. After `prepare`: the adapters bring dropout layers of their own.
    models.disable_dropout(policy.module)

    reference_uri = config.inputs.reference or model_uri
    if policy.adapters is not None and reference_uri == model_uri:
        reference = frozen_reference(ctx, hp, policy, None)
    else:
        reference_dir = (
            policy_dir if reference_uri == model_uri else loop.fetch_model(ctx, reference_uri, "reference")
        )
        reference = frozen_reference(ctx, hp, policy, reference_dir)
    reward, ground_truth = scorers.reward_sources(
        config.inputs.reward_model,
        hp,
        ctx.scratch,
        device=ctx.device,
        batch_size=hp.forward_batch_size,
        stage="ppo",
    )
    chat_format = data.tokenizer_chat_format(tokenizer)
    prompts = data.load(data_uri, ctx.scratch / "data", lambda row: data.prompt_text(row, chat_format))
    global_batch = hp.rollout_batch_size * world
    sampler = data.EpochSampler(len(prompts), global_batch, seed=config.seed)

    policy.reshard()
    optimizer = loop.make_optimizer(policy.module, hp)
    scheduler = loop.make_scheduler(optimizer, hp, hp.steps)
    # FSDP already split the model; everything else goes through accelerate (DDP, autocast).
    wrapped = policy.module
    if not policy.sharded:
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    kl_controller = rl.make_kl_controller(
        init_kl_coef=hp.init_kl_coef, target_kl=hp.target_kl, horizon=hp.kl_horizon
    )
    step, position, first_score = 0, data.DataPosition(), None
    if resume is not None:
        loop.load_shards(policy, wrapped, optimizer, resume)
        restored = loop.restore_training_state(
            ctx, resume, optimizer=optimizer, scheduler=scheduler, total=hp.steps
        )
        step, position = restored.step, restored.position
        kl_controller = rl.kl_controller_from_state(restored.state["kl_controller"])
        first_score = restored.state.get("first_score")
    unwrapped: ActorCritic = accelerator.unwrap_model(wrapped)

    def write_full(dest: Path) -> None:
        models.save_pretrained(policy.lm, tokenizer, dest)
        unwrapped.value_writer(policy, tokenizer)(dest)

    def save(at_step: int) -> None:
        loop.save_trainable_state(
            ctx,
            policy,
            wrapped,
            step=at_step,
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            write_model=write_full,
            tokenizer=tokenizer,
            hp=hp,
            extra_state={"kl_controller": kl_controller.state_dict(), "first_score": first_score},
        )

    def score_fn(samples: Samples) -> torch.Tensor:
        return scorers.score_tensor(reward, samples.prompts, samples.completions)

    params = [p for p in wrapped.parameters() if p.requires_grad]
    last: dict[str, float] = {}
    progress = loop.Progress(ctx, total=hp.steps, log_every=hp.log_every, examples=len(prompts))
    while step < hp.steps:
        mine, position, seed = loop.rollout_prompts(ctx, sampler, position, prompts, step=step)
        # Under mixed precision the reference must see the same autocast as the policy, or the
        # precision gap alone would show up as KL.
        with accelerator.autocast(), policy.gathered():
            rollout = collect_rollout(
                model=unwrapped,
                reference=reference,
                tokenizer=tokenizer,
                prompts=mine,
                score_fn=score_fn,
                beta=kl_controller.value,
                hp=hp,
            )
        stats = ppo_update(
            model=wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            rollout=rollout,
            hp=hp,
            generator=torch.Generator().manual_seed(seed),
            backward=accelerator.backward,
            clip_grad_norm=lambda max_norm: loop.clip_gradients(policy, params, max_norm, accelerator),
        )
        sums = {
            "score": float(rollout.scores.sum()),
            "kl": float(rollout.kl.sum()),
            "completion_length": float(rollout.mask.sum()),
            **{name: value * len(rollout) for name, value in asdict(stats).items()},
            "entropy": float(rollout.entropy) * len(rollout),
        }
        if ground_truth is not None:
            true_scores = scorers.score_tensor(ground_truth, rollout.prompts, rollout.completions)
            sums["true_score"] = float(true_scores.sum())
        means = {name: value / global_batch for name, value in ctx.sum_across_ranks(sums).items()}
        beta = kl_controller.value
        kl_controller = kl_controller.update(current_kl=means["kl"], n_steps=global_batch)
        step += 1
        if first_score is None:
            first_score = means["score"]
        last = {**means, "beta": beta}
        progress.step_done(step, last, lr=scheduler.get_last_lr()[0], position=position)
        if hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < hp.steps:
            save(step)

    metrics: dict[str, Any] = {
        "steps": step,
        "first_score": first_score,
        **last,
        "kl_coef": kl_controller.value,
    }
    metrics.update(loop.memory_metrics(policy, ctx.device))
    # Collective, on every rank: a sharded or adapted policy is assembled on rank 0.
    write_policy = policy.writer(tokenizer)
    write_value = unwrapped.value_writer(policy, tokenizer)

    def write_model(dest: Path) -> None:
        write_policy(dest)
        write_value(dest)

    runtime.publish_results(ctx, metrics, write_model, steps=step)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.run_stage("ppo", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
