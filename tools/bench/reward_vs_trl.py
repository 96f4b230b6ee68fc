#!/usr/bin/env python3
"""Reward-model training steps per second: kubealign against TRL 1.12's RewardTrainer, in one run.

    .venv/bin/python tools/bench/reward_vs_trl.py
    .venv/bin/python tools/bench/reward_vs_trl.py --steps 60 --batch-size 16 --hidden 128 --layers 4

Both sides train the same tiny Llama reward model (saved once, loaded by each) with a
Bradley-Terry loss on the same preference pairs built from the sentiment example, with the same
batch size, learning rate (constant), fused AdamW, gradient clipping at 1.0, the same precision
(fp32 on CPU, bf16 autocast on GPU), the same token ids (TRL gets kubealign's
``chosen_ids``/``rejected_ids``) and the same batches in the same order, so the per-step losses
must agree; the script prints the largest difference.

Timed: only training steps. A side's figure is 1 / the median interval between consecutive
step ends after ``--warmup`` steps, in process CPU time with one torch thread (``--threads 1``)
on CPU, wall-clock with a GPU (or ``--wall``). ``--rounds`` alternates the sides and prints
medians. Still TRL 1.12 and a tiny model: tools/bench/dpo_vs_trl.py is the realistic-size
comparison (TRL 1.16, SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402  (the environment switches above must precede the imports)
from _common import SENTIMENT, build_policy_and_reward  # noqa: E402

from kubealign_jobs import data, reward, runtime  # noqa: E402
from kubealign_jobs import model as models  # noqa: E402

if TYPE_CHECKING:
    from transformers import Trainer


def build_inputs(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, Path, list[dict[str, str]]]:
    """Tokenizer + tiny Llama + reward model on disk, and preference rows in kubealign's batch order."""
    sft = [json.loads(line) for line in (SENTIMENT / "sft.jsonl").read_text().splitlines()]
    policy_dir, reward_dir = build_policy_and_reward(args, workdir, reward_name="reward_init")
    count = args.steps * args.batch_size
    rows = [
        {
            "prompt": sft[i]["prompt"],
            "chosen": sft[i]["completion"],
            "rejected": sft[(i + 7) % len(sft)]["completion"],
        }
        for i in range(count)
    ]
    data_path = workdir / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The order kubealign's sampler will draw them in; TRL reads them sequentially in this order.
    sampler = data.EpochSampler(count, args.batch_size, seed=0)
    position = data.DataPosition()
    order: list[int] = []
    for _ in range(args.steps):
        batch, position = sampler.next_batch(position)
        order.extend(batch)
    return policy_dir, reward_dir, data_path, [rows[i] for i in order]


def run_kubealign(
    stage: str, args: argparse.Namespace, workdir: Path, model_dir: Path, data_path: Path
) -> tuple[float, list[float]]:
    """Run the stage in-process; return steps/s over the timed window and the per-step losses."""
    hyper: dict[str, Any] = {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "log_every": 1,
        "checkpoint_every": 0,
        "max_length": 128,
        "mixed_precision": "bf16" if torch.cuda.is_available() else "no",
    }
    hyper["eval_fraction"] = 0.0
    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / f"ours-{stage}"
    config = {
        "run": "bench",
        "stage": stage,
        "type": stage,
        "output": str(output),
        "inputs": {"model": str(model_dir), "data": str(data_path)},
        "hyperparameters": hyper,
    }
    config_path = workdir / f"{stage}.json"
    config_path.write_text(json.dumps(config))
    stamps: list[tuple[float, dict[str, Any]]] = []
    original = runtime.emit

    def recording_emit(record: dict[str, Any]) -> None:
        stamps.append((clock(), record))

    runtime.emit = recording_emit
    fresh_accelerate_state()
    try:
        code = reward.main(["--config", str(config_path)])
    finally:
        runtime.emit = original
    if code != 0:
        raise SystemExit(f"kubealign {stage} failed with exit code {code}")
    steps = [(t, r) for t, r in stamps if "step" in r and "event" not in r]
    rate = steps_per_second([t for t, _ in steps], args.warmup)
    return rate, [float(r["loss"]) for _, r in steps]


def clock() -> float:
    now: float = CLOCK[0]()
    return now


CLOCK: list[Any] = [time.process_time]


def steps_per_second(step_ends: list[float], warmup: int) -> float:
    """1 / median step time after the warmup: robust to the odd preemption on a shared machine."""
    intervals = [b - a for a, b in itertools.pairwise(step_ends[warmup - 1 :])]
    return 1.0 / statistics.median(intervals)


def fresh_accelerate_state() -> None:
    """Each side sets up accelerate its own way; the process-wide singleton must not leak between them."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def train_in_order(
    trainer_class: type[Trainer], warmup: int, **trainer_args: Any
) -> tuple[float, list[float]]:
    """Train a TRL trainer on its dataset in order; return its steps/s after ``warmup`` and each step's loss.

    The sequential sampler makes TRL take the batches kubealign's sampler drew (the rows come
    in that order), so the two sides' losses can be compared step by step.
    """
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    losses: list[torch.Tensor] = []
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamps.append(clock())

    class InOrder(trainer_class):  # type: ignore[misc,valid-type]
        def _get_train_sampler(self, *_: Any, **__: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)
            losses.append(loss.detach())
            return loss

    InOrder(callbacks=[Timer()], **trainer_args).train()
    return steps_per_second(stamps, warmup), [float(x) for x in losses]


def trl_training_args(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """The TrainingArguments both TRL trainers get: the same optimiser step, precision and length as ours."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused",  # the transformers default with torch >= 2.8, as on our side
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "bf16": torch.cuda.is_available(),  # TRL defaults to bf16 even on CPU; both sides: same precision
        "dataloader_pin_memory": False,
        "max_length": 128,
        "seed": 0,
    }


def run_trl_reward(
    args: argparse.Namespace, workdir: Path, reward_dir: Path, rows: list[dict[str, str]]
) -> tuple[float, list[float]]:
    from datasets import Dataset
    from trl.trainer.reward_config import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    tokenizer = models.load_tokenizer(reward_dir)

    fresh_accelerate_state()
    # The exact sequences kubealign scores: [bos] prompt answer [eos].
    tokenized = []
    for row in rows:
        chosen, rejected = data.encode_ranking(
            tokenizer, row["prompt"], (row["chosen"], row["rejected"]), max_length=128
        ).sequences
        tokenized.append({"chosen_ids": list(chosen.ids), "rejected_ids": list(rejected.ids)})
    config = RewardConfig(**trl_training_args(args, workdir / "trl-reward"))
    return train_in_order(
        RewardTrainer,
        args.warmup,
        model=models.load_reward_model(reward_dir, tokenizer=tokenizer),
        args=config,
        train_dataset=Dataset.from_list(tokenized),
        processing_class=tokenizer,
    )


@dataclass
class Comparison:
    """One kubealign-vs-TRL pairing over several rounds."""

    name: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    our_losses: list[float] = field(default_factory=list)
    their_losses: list[float] = field(default_factory=list)

    def add(self, ours: tuple[float, list[float]], theirs: tuple[float, list[float]]) -> None:
        self.ours.append(ours[0])
        self.theirs.append(theirs[0])
        self.our_losses, self.their_losses = ours[1], theirs[1]

    def report(self) -> None:
        diffs = [abs(a - b) for a, b in zip(self.our_losses, self.their_losses, strict=True)]
        ratios = [a / b for a, b in zip(self.ours, self.theirs, strict=True)]
        print(
            f"{self.name:<34} kubealign {statistics.median(self.ours):7.2f} steps/s   "
            f"TRL {statistics.median(self.theirs):7.2f} steps/s   ratio {statistics.median(ratios):5.2f}x "
            f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})   |loss diff| step 1 {diffs[0]:.1e}, "
            f"max {max(diffs):.1e} over {len(diffs)} steps "
            f"(loss {self.our_losses[0]:.4f} -> {self.our_losses[-1]:.4f})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed, at the start of each run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating runs of each side; medians are printed"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of CPU time")
    args = parser.parse_args()
    if args.wall or torch.cuda.is_available():
        CLOCK[0] = time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    reward_pairs = Comparison("reward vs RewardTrainer")
    with tempfile.TemporaryDirectory(prefix="kubealign-bench-") as tmp:
        workdir = Path(tmp)
        _, reward_dir, data_path, ordered = build_inputs(args, workdir)
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
        )
        clock_name = "wall-clock" if CLOCK[0] is time.perf_counter else "process CPU"
        print(
            f"device {device}; llama hidden {args.hidden} x {args.layers} layers; "
            f"batch {args.batch_size} pairs; "
            f"{args.steps} steps ({args.warmup} untimed); {args.rounds} rounds; {clock_name} time",
            flush=True,
        )
        for round_index in range(args.rounds):
            rate, losses = run_kubealign("reward", args, workdir / f"r{round_index}", reward_dir, data_path)
            reward_pairs.add((rate, losses), run_trl_reward(args, workdir, reward_dir, ordered))
    reward_pairs.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
