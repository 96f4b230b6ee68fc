#!/usr/bin/env python3
"""PPO rollout + update time per batch: kubealign's ppo against TRL 1.12's PPOTrainer, in one run.

    .venv/bin/python tools/bench/ppo_vs_trl.py
    .venv/bin/python tools/bench/ppo_vs_trl.py --batch-size 32 --response-length 24 --hidden 128 --batches 8

Both sides get the same tiny Llama policy (and a frozen copy as the reference), the same reward
model (a sequence classifier with one label), the same prompts from the sentiment example, the
same batch size, response length, temperature, PPO epochs and minibatches, and stop at EOS.
TRL 1.12 is the last TRL with a PPOTrainer (``trl.experimental.ppo``; 1.16 dropped it): the script
installs it once under the cache (pip --no-deps --target) and imports it from there, beside the
dev environment's TRL 1.16. TRL's PPOTrainer also needs a value model: a sequence
classifier like the reward model, as in TRL's examples; kubealign's value head sits on the
policy's last hidden state.

One batch is one rollout (generate, score, log-probs, values, advantages) and its PPO update
(``--ppo-epochs`` passes over ``--batch-size / --mini-batch-size`` minibatches). TRL's time per
batch is the interval between consecutive ``on_step_end`` callbacks (everything its loop does
per batch); kubealign's is the time of ``collect_rollout`` + ``ppo_update``. The sides alternate
for ``--rounds`` rounds of ``--batches`` timed batches each (TRL gets a fresh trainer per round;
the first ``--warmup`` batches of a trainer are not timed), so a change in the machine's load
hits both alike.

Prints, per side, the median wall time and the median CPU time of this process per batch, and
the ratios. On a shared machine the CPU time is the steadier figure: other processes stretch
the wall time of whichever side happens to run beside them.
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
from kubealign_jobs.sampling import Samples  # noqa: E402

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


def kubealign_runner(
    args: argparse.Namespace, policy_dir: Path, reward_dir: Path, prompts: list[str]
) -> Callable[[int], list[Timing]]:
    """A function that runs the next ``n`` PPO batches of one continuing kubealign run, timing each."""
    tokenizer = models.load_tokenizer(policy_dir)
    model = ppo.PolicyWithValueHead(use_fast_masks(models.load_causal_lm(policy_dir)))
    reference = use_fast_masks(models.load_causal_lm(policy_dir)).eval().requires_grad_(False)
    models.disable_dropout(model)
    reward = scorers.RewardModelScorer(
        use_fast_masks(models.load_reward_model(reward_dir, tokenizer=tokenizer)).requires_grad_(False),
        tokenizer,
    )
    hp = stages.PPOHyperparameters(
        rollout_batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.response_length,
        learning_rate=3e-6,
        init_kl_coef=0.05,
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


def trl_round(
    args: argparse.Namespace, policy_dir: Path, reward_dir: Path, prompts: list[str], workdir: Path
) -> tuple[list[Timing], list[float]]:
    """A fresh TRL PPOTrainer over ``--warmup + --batches`` batches: the timings of the last
    ``--batches``, and the wall time of each of those batches spent in ``gc.collect()``.

    TRL's loop calls ``gc.collect()`` twice per batch; on a small model that is most of its time,
    so it is measured (every call is timed) and reported beside the totals, not silently counted.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # type: ignore[import-not-found]

    tokenizer = models.load_tokenizer(policy_dir)
    tokenizer.padding_side = "left"  # TRL generates from the left-padded prompt batch as is
    bos = [tokenizer.bos_token_id]
    # The same prompt tokens kubealign samples from: [bos] + prompt.
    dataset = Dataset.from_dict(
        {"input_ids": [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]}
    )
    policy = models.load_causal_lm(policy_dir)
    reference = copy.deepcopy(policy)
    reward = AutoModelForSequenceClassification.from_pretrained(
        str(reward_dir), local_files_only=True, num_labels=1
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        str(reward_dir), local_files_only=True, num_labels=1
    )
    total = args.warmup + args.batches
    config = PPOConfig(
        output_dir=str(workdir / "trl"),
        # One optimizer step per minibatch of --mini-batch-size rows, as kubealign does: TRL's
        # minibatch is local_batch / num_mini_batches, and with no accumulation each is one step.
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.mini_batch_size,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=total * args.batch_size,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length,
        stop_token="eos",
        temperature=1.0,
        learning_rate=3e-6,
        kl_coef=0.05,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1_000_000,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        fp16=False,
    )
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

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(args.batch_size)),
        callbacks=[Stamp()],
    )
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
        ours_next = kubealign_runner(args, policy_dir, reward_dir, prompts)
        ours_next(args.warmup)
        ours: list[Timing] = []
        theirs: list[Timing] = []
        theirs_gc: list[float] = []
        # Rounds alternate the two sides, so a change in the machine's load hits both alike.
        for _ in range(args.rounds):
            ours += ours_next(args.batches)
            timings, in_gc = trl_round(args, policy_dir, reward_dir, prompts, workdir)
            theirs += timings
            theirs_gc += in_gc

    for label, index in (("wall", 0), ("cpu", 1)):
        mine = statistics.median(t[index] for t in ours)
        trl = statistics.median(t[index] for t in theirs)
        print(f"{label} kubealign ppo : {mine * 1000:8.1f} ms/batch  (all: {_ms([t[index] for t in ours])})")
        print(f"{label} trl PPOTrainer: {trl * 1000:8.1f} ms/batch  (all: {_ms([t[index] for t in theirs])})")
        print(f"{label} speedup: {trl / mine:.2f}x")
    wall = statistics.median(t[0] for t in ours)
    trl_wall = statistics.median(t[0] for t in theirs)
    without = statistics.median(t[0] - g for t, g in zip(theirs, theirs_gc, strict=True))
    print(
        f"of TRL's wall time per batch, gc.collect(): median {statistics.median(theirs_gc) * 1000:.1f} ms "
        f"({statistics.median(g / t[0] for t, g in zip(theirs, theirs_gc, strict=True)):.0%}); "
        f"TRL without it {without * 1000:.1f} ms/batch: speedup {without / wall:.2f}x "
        f"(with it {trl_wall / wall:.2f}x)"
    )
    print(
        "not like-for-like yet: TRL trains a separate value model (a sequence classifier) where kubealign "
        "uses a value head on the policy, and the first updates are not checked equal"
    )
    return 0


def _ms(values: list[float]) -> str:
    return " ".join(f"{v * 1000:.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
