#!/usr/bin/env python3
"""PPO rollout + update time per batch: kubealign's ppo against TRL 1.12's PPOTrainer, in one run.

    .venv/bin/python tools/bench/ppo_vs_trl.py
    .venv/bin/python tools/bench/ppo_vs_trl.py --batch-size 32 --response-length 24 --hidden 128 --batches 8

Both sides get the same tiny Llama policy (and a frozen copy as the reference), the same reward
model (a sequence classifier with one label), the same prompts from the sentiment example, the
same batch size, response length, temperature, PPO epochs and minibatches, and stop at EOS.
TRL 1.12 is the last TRL with a PPOTrainer (``trl.experimental.ppo``; 1.16 dropped it): the script
installs it once under the cache (pip --no-deps --target) and imports it from there, beside the
dev environment's TRL 1.16.

Like for like, by construction (the script prints these settings):
- the same value model: TRL's PPOTrainer trains a separate critic, a sequence classifier
  initialised from the reward model; kubealign runs ``value_model: separate``, the same
  architecture from the same weights (``--value-model head``, kubealign's default, adds a row);
- the same attention path: both sides' models use kubealign's broadcast-built SDPA masks
  (``use_fast_masks``), so neither pays transformers' vmap mask construction alone;
- fp32, AdamW (lr 3e-6, no weight decay), no gradient clipping (TRL's PPO loop clips nothing),
  no gradient checkpointing, k1 KL at a fixed coefficient 0.05, GAE gamma 1 and lambda 0.95,
  clip ranges 0.2, value-loss weight 0.1, no logging inside the timed window.

Before timing, the first update is checked equal: TRL runs one batch; the script records its
rollout (the prompt and response tokens it sampled, with EOS never ending a response, so that
TRL's convention for the value after the last token, one position past it, does not differ from
kubealign's, 0) and its reward scores, and kubealign scores the same rollout and runs its update
from the same initial weights. It prints both sides' KL, score, policy and value losses, and the
largest difference between the two updated policies' log-probs on the rollout.

One batch is one rollout (generate, score, log-probs, values, advantages) and its PPO update
(``--ppo-epochs`` passes over ``--batch-size / --mini-batch-size`` minibatches). TRL's time per
batch is the interval between consecutive ``on_step_end`` callbacks (everything its loop does
per batch); kubealign's is the time of ``collect_rollout`` + ``ppo_update``. The sides alternate
for ``--rounds`` rounds of ``--batches`` timed batches each (TRL gets a fresh trainer per round;
the first ``--warmup`` batches of a trainer are not timed), so a change in the machine's load
hits both alike.

Prints, per side, the median wall time and the median CPU time of this process per batch, and
the ratios, with TRL's two ``gc.collect()`` calls per batch timed and reported apart. On a shared
machine the CPU time is the steadier figure: other processes stretch the wall time of whichever
side happens to run beside them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402  (the environment switches above must precede the imports)
from _common import SENTIMENT, build_policy_and_reward, install_trl  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from kubealign_jobs import loop, ppo, scorers, stages  # noqa: E402
from kubealign_jobs import model as models  # noqa: E402
from kubealign_jobs.attention import use_fast_masks  # noqa: E402
from kubealign_jobs.ppo import ReferenceFn  # noqa: E402
from kubealign_jobs.sampling import Samples, completion_logits, completion_logps  # noqa: E402

PPO_TRL_VERSION = "1.12.0"


def build_models(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, list[str]]:
    """A tokenizer trained on the sentiment corpus, a tiny Llama policy and a reward model, on disk."""
    prompts = [json.loads(line)["prompt"] for line in (SENTIMENT / "prompts.jsonl").read_text().splitlines()]
    policy_dir, reward_dir = build_policy_and_reward(args, workdir, reward_name="reward")
    return policy_dir, reward_dir, prompts


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def clock() -> Timing:
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


LEARNING_RATE = 3e-6
KL_COEF = 0.05


def kubealign_models(
    args: argparse.Namespace,
    policy_dir: Path,
    reward_dir: Path,
    value_model: str,
    *,
    reference_dir: Path | None = None,
    **settings: Any,
) -> tuple[ppo.ActorCritic, ReferenceFn, stages.PPOHyperparameters]:
    """kubealign's policy with its critic (a head, or a separate one from the reward model),
    the frozen reference (the policy's weights unless ``reference_dir``) and the stage settings
    that match TRL's."""
    tokenizer = models.load_tokenizer(policy_dir)
    policy = use_fast_masks(models.load_causal_lm(policy_dir))
    model: ppo.ActorCritic
    if value_model == "separate":
        critic = use_fast_masks(models.load_reward_model(reward_dir, tokenizer=tokenizer))
        model = ppo.PolicyWithCritic(policy, critic)
    else:
        model = ppo.PolicyWithValueHead(policy)
    models.disable_dropout(model)
    frozen = use_fast_masks(models.load_causal_lm(reference_dir or policy_dir)).eval().requires_grad_(False)

    def reference(ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        logits: torch.Tensor = completion_logits(frozen, ids, mask, width).logits
        return logits

    values: dict[str, Any] = {
        "rollout_batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size,
        "forward_batch_size": args.batch_size,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.response_length,
        "learning_rate": LEARNING_RATE,
        "weight_decay": 0.0,
        "grad_clip": 0.0,
        "init_kl_coef": KL_COEF,
        "value_model": value_model,
    }
    hp = stages.PPOHyperparameters(**(values | settings))
    return model, reference, hp


def kubealign_runner(
    args: argparse.Namespace, policy_dir: Path, reward_dir: Path, prompts: list[str], value_model: str
) -> Callable[[int], list[Timing]]:
    """A function that runs the next ``n`` PPO batches of one continuing kubealign run, timing each."""
    tokenizer = models.load_tokenizer(policy_dir)
    model, reference, hp = kubealign_models(args, policy_dir, reward_dir, value_model)
    reward = scorers.RewardModelScorer(
        use_fast_masks(models.load_reward_model(reward_dir, tokenizer=tokenizer)).requires_grad_(False),
        tokenizer,
    )
    optimizer = loop.make_optimizer(model, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(0)
    batches_done = 0

    def score_fn(samples: Samples) -> torch.Tensor:
        return scorers.score_tensor(reward, samples.prompts, samples.completions)

    def run(n: int) -> list[Timing]:
        nonlocal batches_done
        timings = []
        for _ in range(n):
            first = batches_done * args.batch_size
            rows = [prompts[(first + i) % len(prompts)] for i in range(args.batch_size)]
            start = clock()
            rollout = ppo.collect_rollout(
                model=model,
                reference=reference,
                tokenizer=tokenizer,
                prompts=rows,
                score_fn=score_fn,
                beta=0.05,
                hp=hp,
            )
            ppo.ppo_update(
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                rollout=rollout,
                hp=hp,
                generator=generator,
                backward=torch.Tensor.backward,
                clip_grad_norm=lambda norm: torch.nn.utils.clip_grad_norm_(model.parameters(), norm),
            )
            timings.append(since(start))
            batches_done += 1
        return timings

    return run


def trl_trainer(
    args: argparse.Namespace,
    policy_dir: Path,
    reward_dir: Path,
    prompts: list[str],
    workdir: Path,
    *,
    batches: int,
    callbacks: list[Any],
    seed: int = 0,
    check: bool = False,
    reference_dir: Path | None = None,
) -> Any:
    """TRL 1.12's PPOTrainer for ``batches`` batches with the settings of `kubealign_models`.

    ``check``: one minibatch per PPO epoch (so the minibatch order cannot matter) and EOS never
    ends a response, as the equivalence check needs. ``reference_dir``: a reference other than
    the policy's own weights.
    """
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # type: ignore[import-not-found]

    tokenizer = models.load_tokenizer(policy_dir)
    tokenizer.padding_side = "left"  # TRL generates from the left-padded prompt batch as is
    bos = [tokenizer.bos_token_id]
    # The same prompt tokens kubealign samples from: [bos] + prompt.
    dataset = Dataset.from_dict(
        {"input_ids": [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]}
    )
    policy = use_fast_masks(models.load_causal_lm(policy_dir))
    if check:
        policy.generation_config.eos_token_id = None
    reference = (
        copy.deepcopy(policy)
        if reference_dir is None
        else use_fast_masks(models.load_causal_lm(reference_dir))
    )
    reward = use_fast_masks(
        AutoModelForSequenceClassification.from_pretrained(
            str(reward_dir), local_files_only=True, num_labels=1
        )
    )
    value = use_fast_masks(
        AutoModelForSequenceClassification.from_pretrained(
            str(reward_dir), local_files_only=True, num_labels=1
        )
    )
    mini_batch = args.batch_size if check else args.mini_batch_size
    config = PPOConfig(
        output_dir=str(workdir / "trl"),
        # One optimizer step per minibatch of --mini-batch-size rows, as kubealign does: TRL's
        # rollout batch is per_device_train_batch_size x gradient_accumulation_steps, its
        # minibatch that / num_mini_batches, and with no accumulation each is one step.
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // mini_batch,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=batches * args.batch_size,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length,
        stop_token=None if check else "eos",
        temperature=1.0,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        kl_coef=KL_COEF,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1 if check else 1_000_000,
        disable_tqdm=True,
        seed=seed,
        bf16=False,
        fp16=False,
    )
    return PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(args.batch_size)),
        callbacks=callbacks,
    )


def trl_round(
    args: argparse.Namespace, policy_dir: Path, reward_dir: Path, prompts: list[str], workdir: Path
) -> tuple[list[Timing], list[float]]:
    """A fresh TRL PPOTrainer over ``--warmup + --batches`` batches: the timings of the last
    ``--batches``, and the wall time of each of those batches spent in ``gc.collect()``.

    TRL's loop calls ``gc.collect()`` twice per batch; on a small model that is most of its time,
    so it is measured (every call is timed) and reported beside the totals, not silently counted.
    """
    from transformers import TrainerCallback

    stamps: list[Timing] = []
    collected = [0.0]  # seconds in gc.collect so far
    gc_marks: list[float] = []
    collect = gc.collect

    def timed_collect(generation: int = 2) -> int:
        began = time.perf_counter()
        found = collect(generation)
        collected[0] += time.perf_counter() - began
        return found

    class Stamp(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            stamps.append(clock())
            gc_marks.append(collected[0])

        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamps.append(clock())
            gc_marks.append(collected[0])

    total = args.warmup + args.batches
    trainer = trl_trainer(args, policy_dir, reward_dir, prompts, workdir, batches=total, callbacks=[Stamp()])
    gc.collect = timed_collect
    try:
        trainer.train()
    finally:
        gc.collect = collect
    intervals = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(stamps)]
    if len(intervals) != total:
        raise RuntimeError(f"expected {total} TRL batches, timed {len(intervals)}")
    in_gc = [b - a for a, b in itertools.pairwise(gc_marks)]
    return intervals[args.warmup :], in_gc[args.warmup :]


def trl_first_batch(
    args: argparse.Namespace,
    policy_dir: Path,
    reward_dir: Path,
    prompts: list[str],
    workdir: Path,
    *,
    seed: int,
    reference_dir: Path,
) -> tuple[Any, torch.Tensor, list[dict[str, float]]]:
    """TRL's trainer after one check-mode batch, the prompt + response tokens it sampled, its logs."""
    import trl.experimental.ppo.ppo_trainer as trl_ppo  # type: ignore[import-not-found]
    from transformers import TrainerCallback

    recorded: list[torch.Tensor] = []
    logged: list[dict[str, float]] = []
    generate = trl_ppo.batch_generation

    def recording(*call: Any, **kwargs: Any) -> Any:
        query_responses, logits = generate(*call, **kwargs)
        recorded.append(query_responses.clone())
        return query_responses, logits

    class Logs(TrainerCallback):
        def on_log(self, *_: Any, logs: Any = None, **__: Any) -> None:
            logged.append(dict(logs or {}))

    trainer = trl_trainer(
        args,
        policy_dir,
        reward_dir,
        prompts,
        workdir,
        batches=1,
        callbacks=[Logs()],
        seed=seed,
        check=True,
        reference_dir=reference_dir,
    )
    trl_ppo.batch_generation = recording
    try:
        trainer.train()
    finally:
        trl_ppo.batch_generation = generate
    return trainer, recorded[0], logged


def check_first_update(
    args: argparse.Namespace, policy_dir: Path, reward_dir: Path, prompts: list[str], workdir: Path
) -> float:
    """One batch of TRL, then kubealign's update of TRL's own rollout; prints both, returns the
    largest |log-prob difference| between the two updated policies on that rollout."""
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    tokenizer = models.load_tokenizer(policy_dir)
    pad = int(tokenizer.pad_token_id)
    width = args.response_length
    # A reference other than the starting policy, so the KL penalty is not zero in the check.
    perturbed = models.load_causal_lm(policy_dir)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    reference_dir = models.save_pretrained(perturbed, tokenizer, workdir / "reference")
    for seed in range(10):
        trainer, query_responses, logged = trl_first_batch(
            args, policy_dir, reward_dir, prompts, workdir, seed=seed, reference_dir=reference_dir
        )
        responses = query_responses[:, -width:]
        # A sampled pad token would end the row for TRL (it finds lengths by the pad id): retry.
        if not (responses == pad).any():
            break
    else:
        raise RuntimeError("no seed in 10 gave a rollout without pad tokens")
    trl_logs = next(entry for entry in logged if "loss/policy_avg" in entry)

    context = query_responses.shape[1] - width
    queries = query_responses[:, :context]
    reward_model = use_fast_masks(
        AutoModelForSequenceClassification.from_pretrained(
            str(reward_dir), local_files_only=True, num_labels=1
        )
    )
    with torch.no_grad():
        _, trl_scores, _ = trl_ppo.get_reward(reward_model, query_responses, pad, context)
    samples = Samples(
        prompts=[""] * len(queries),
        completions=[""] * len(queries),
        prompt_ids=queries,
        prompt_mask=(queries != pad).long(),
        completion_ids=responses,
        completion_mask=torch.ones_like(responses),
    )
    model, reference, hp = kubealign_models(
        args, policy_dir, reward_dir, "separate", reference_dir=reference_dir, mini_batch_size=args.batch_size
    )
    optimizer = loop.make_optimizer(model, hp)
    rollout = ppo.score_rollout(
        model=model,
        reference=reference,
        tokenizer=tokenizer,
        samples=samples,
        score_fn=lambda _samples: trl_scores.float(),
        beta=KL_COEF,
        hp=hp,
    )
    stats = ppo.ppo_update(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        rollout=rollout,
        hp=hp,
        generator=torch.Generator().manual_seed(0),
        backward=torch.Tensor.backward,
        clip_grad_norm=lambda norm: torch.nn.utils.clip_grad_norm_(model.parameters(), norm),
    )
    pairs = {
        "kl (nats per sequence)": (float(rollout.kl.mean()), trl_logs["objective/kl"]),
        "score": (float(rollout.scores.mean()), trl_logs["objective/scores"]),
        "policy loss (mean over updates)": (stats.policy_loss, trl_logs["loss/policy_avg"]),
        "value loss (mean over updates)": (stats.value_loss, trl_logs["loss/value_avg"]),
    }
    print(
        f"first-update check (TRL seed {seed}, {len(queries)} rows x {width} tokens, one minibatch x "
        f"{args.ppo_epochs} PPO epochs):"
    )
    for name, (ours, theirs) in pairs.items():
        print(f"  {name:32s} kubealign {ours: .7f}  TRL {theirs: .7f}  |diff| {abs(ours - theirs):.1e}")
    # Each policy's log-probs of the rollout's tokens (the samples' mask is TRL's: no pad in them).
    ours_logps = completion_logps(model.policy, samples)
    theirs_logps = completion_logps(trainer.model.policy.eval(), samples)
    before = completion_logps(use_fast_masks(models.load_causal_lm(policy_dir)), samples)
    moved = float((theirs_logps - before).abs().max())
    diff = float((ours_logps - theirs_logps).abs().max())
    print(
        f"  updated policies' log-probs on the rollout: max |diff| {diff:.1e} "
        f"(the update moved them by up to {moved:.1e})"
    )
    return max(diff, *(abs(a - b) for a, b in pairs.values()))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts (rollouts) per batch")
    parser.add_argument("--mini-batch-size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=24, help="max new tokens")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before each side's timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (kubealign, then TRL)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared box)"
    )
    parser.add_argument(
        "--value-model",
        choices=("separate", "head"),
        default="separate",
        help="separate: time kubealign with TRL's critic layout; head: also kubealign's default value head",
    )
    args = parser.parse_args()
    if args.batch_size % args.mini_batch_size:
        parser.error("--mini-batch-size must divide --batch-size")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(install_trl(PPO_TRL_VERSION)))  # ahead of the venv's TRL 1.16

    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        workdir = Path(tmp)
        policy_dir, reward_dir, prompts = build_models(args, workdir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(
            f"policy: llama hidden={args.hidden} layers={args.layers} vocab={args.vocab_size}; "
            f"batch={args.batch_size} minibatch={args.mini_batch_size} ppo_epochs={args.ppo_epochs} "
            f"response_length={args.response_length}; device={device} threads={args.threads}",
            flush=True,
        )
        print(
            "both sides: fp32, AdamW lr 3e-6 without weight decay, no gradient clipping, no gradient "
            "checkpointing, broadcast SDPA masks, k1 KL x 0.05, gamma 1, lambda 0.95, clip 0.2/0.2, "
            "value loss x 0.1; critic: a separate sequence classifier from the reward model",
            flush=True,
        )
        worst = check_first_update(args, policy_dir, reward_dir, prompts, workdir)
        variants = ["separate"] + (["head"] if args.value_model == "head" else [])
        runners = {v: kubealign_runner(args, policy_dir, reward_dir, prompts, v) for v in variants}
        for runner in runners.values():
            runner(args.warmup)
        ours: dict[str, list[Timing]] = {v: [] for v in variants}
        theirs: list[Timing] = []
        theirs_gc: list[float] = []
        # Rounds alternate the sides, so a change in the machine's load hits them alike.
        for _ in range(args.rounds):
            for variant, runner in runners.items():
                ours[variant] += runner(args.batches)
            timings, in_gc = trl_round(args, policy_dir, reward_dir, prompts, workdir)
            theirs += timings
            theirs_gc += in_gc

    trl_wall = statistics.median(t[0] for t in theirs)
    without = statistics.median(t[0] - g for t, g in zip(theirs, theirs_gc, strict=True))
    for label, index in (("wall", 0), ("cpu", 1)):
        trl = statistics.median(t[index] for t in theirs)
        every = _ms([t[index] for t in theirs])
        print(f"{label} trl PPOTrainer (value model): {trl * 1000:8.1f} ms/batch  (all: {every})")
        for variant, timings in ours.items():
            mine = statistics.median(t[index] for t in timings)
            print(
                f"{label} kubealign ppo ({'separate critic' if variant == 'separate' else 'value head'}): "
                f"{mine * 1000:8.1f} ms/batch  (all: {_ms([t[index] for t in timings])})  "
                f"speedup {trl / mine:.2f}x"
            )
    print(
        f"of TRL's wall time per batch, gc.collect(): median {statistics.median(theirs_gc) * 1000:.1f} ms "
        f"({statistics.median(g / t[0] for t, g in zip(theirs, theirs_gc, strict=True)):.0%}); "
        f"TRL without it: {without * 1000:.1f} ms/batch"
    )
    for variant, timings in ours.items():
        wall = statistics.median(t[0] for t in timings)
        print(
            f"ratio ({variant}) wall: {trl_wall / wall:.2f}x with TRL's gc.collect, "
            f"{without / wall:.2f}x without"
        )
    print(f"first-update check: largest difference {worst:.1e}")
    return 0


def _ms(values: list[float]) -> str:
    return " ".join(f"{v * 1000:.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
