#!/usr/bin/env python3
"""GRPO steps/s: kubealign's grpo stage against TRL 1.16's GRPOTrainer, in one run.

    .venv/bin/python tools/bench/grpo_vs_trl.py
    .venv/bin/python tools/bench/grpo_vs_trl.py --prompts 16 --group-size 8 --max-new-tokens 16 --steps 12

Fair by construction, and printed at the start of every run:

- The same weights (a seeded Llama of --hidden / --layers with a byte-level tokenizer), the same
  prompts (examples/arithmetic's training problems, in the same order on both sides: TRL reads
  them sequentially), the same group size, completion length, temperature 1 (top-p 1, top-k
  off), and the same reward: kubealign's exact_match verifier, given to TRL as its reward
  function.
- The same update: one pass (TRL's num_iterations=1, kubealign's epochs=1) over the whole
  rollout of --prompts x --group-size completions in one optimizer step, no KL term (beta 0: no
  reference on either side), advantages scaled by the group's standard deviation, TRL's
  ``loss_type="grpo"`` (the per-sequence mean, as kubealign's), fused AdamW at a constant
  learning rate, gradient clipping at 1.0, fp32, gradient checkpointing off on both (TRL's config
  default is on), logging every step on both, dropout off on both.
- Timed: the wall time between consecutive step ends, everything each loop does per step
  (sampling, rewards, advantages, the forward and backward pass, the optimizer step, logging);
  the first --warmup steps of each process are not counted, and each side runs alone in its own
  process. The sides alternate for --rounds rounds, so a change in the machine's load hits both
  alike; the rate is the median over every timed step of every round.

Prints both sides' median steps/s (and each round's) and the ratio; the last line is
``ratio <value>``. At this
size sampling dominates both sides' steps (both use transformers' ``generate`` with a KV
cache), so the ratio measures how much each loop adds around it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from _common import REPO_ROOT, install_trl, run_side, trl_step_args  # noqa: E402

from kubealign_jobs import model as models  # noqa: E402
from kubealign_jobs import verifiers  # noqa: E402

ARITHMETIC = REPO_ROOT / "examples" / "arithmetic" / "data"


def build_model(args: argparse.Namespace, workdir: Path) -> Path:
    """A seeded tiny Llama with a byte-level tokenizer, on disk: both sides load these weights."""
    corpus = (ARITHMETIC / "corpus.txt").read_text().splitlines()
    tokenizer = models.train_tokenizer(corpus, vocab_size=259)
    torch.manual_seed(0)
    spec = {
        "arch": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
    }
    folder = workdir / "model"
    models.save_pretrained(models.build_causal_lm(spec, tokenizer=tokenizer), tokenizer, folder)
    return folder


def rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in (ARITHMETIC / "prompts.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- the two sides (children)


def run_ours(settings: dict[str, Any]) -> dict[str, Any]:
    """The grpo stage itself, in this process, with a stage config like the operator renders."""
    workdir = Path(settings["workdir"])
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    config = {
        "apiVersion": "kubealign.io/v1alpha1",
        "kind": "StageConfig",
        "run": "bench",
        "stage": "grpo",
        "type": "grpo",
        # A fresh output per round: a complete artifact would make the stage skip its work.
        "output": (workdir / f"ours-{settings['round']}").as_uri(),
        "resume": (workdir / f"ours-{settings['round']}" / "checkpoints").as_uri(),
        "inputs": {"model": Path(settings["model"]).as_uri(), "data": data.as_uri()},
        "hyperparameters": {
            "steps": settings["steps"],
            "prompts_per_step": settings["prompts"],
            "group_size": settings["group_size"],
            "max_new_tokens": settings["max_new_tokens"],
            "temperature": 1.0,
            "learning_rate": settings["learning_rate"],
            "grad_clip": 1.0,
            "kl_coef": 0.0,
            "verifiers": {"exact_match": 1.0},
            "log_every": 1,
            "checkpoint_every": 0,
            "forward_batch_size": settings["prompts"] * settings["group_size"],
            "mixed_precision": "no",
        },
        "seed": 0,
    }
    path = workdir / "ours.json"
    path.write_text(json.dumps(config))
    ends: list[float] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubealign_jobs.grpo", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        # Progress records are JSON lines; the arrival of a step's record is the end of that step.
        if line.startswith("{") and '"step"' in line and '"total_steps"' in line:
            ends.append(time.perf_counter())
    if proc.wait() != 0:
        raise SystemExit("kubealign's grpo stage failed")
    return {"step_ends": ends}


def run_trl(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same weights, prompts (in order), reward and update."""
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())

    class InOrder(GRPOTrainer):
        def _get_train_sampler(self, *_: Any, **__: Any) -> Any:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

    def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
        return [verifiers.exact_match(c, a) for c, a in zip(completions, answer, strict=True)]

    # Each prompt G times in a row, as GRPO's sampler would repeat it, read in order.
    repeated = [row for row in rows() for _ in range(settings["group_size"])]
    completions = settings["prompts"] * settings["group_size"]
    config = GRPOConfig(
        **trl_step_args(
            Path(settings["workdir"]) / f"trl-{settings['round']}", settings["learning_rate"], gpu=False
        ),
        per_device_train_batch_size=completions,
        num_generations=settings["group_size"],
        max_completion_length=settings["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        disable_dropout=True,
        max_steps=settings["steps"],
        shuffle_dataset=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    trainer = InOrder(
        model=model,
        reward_funcs=[exact_match],
        args=config,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in repeated]),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    return {"step_ends": ends, "version": trl.__version__}


# ---------------------------------------------------------------------------- the comparison (parent)


def side(name: str, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if name == "trl":
        env["PYTHONPATH"] = os.pathsep.join([str(install_trl()), env.get("PYTHONPATH", "")])
    return run_side(__file__, name, settings, env)


def step_times(ends: list[float], warmup: int) -> list[float]:
    gaps = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :], strict=False)]
    if not gaps:
        raise SystemExit(f"too few steps ({len(ends)}) after {warmup} warmup steps; raise --steps")
    return gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="completion length")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.side:
        settings = json.loads(args.settings)
        result = run_ours(settings) if args.side == "ours" else run_trl(settings)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        workdir = Path(tmp)
        settings = {
            "workdir": str(workdir),
            "model": str(build_model(args, workdir)),
            "prompts": args.prompts,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "learning_rate": args.learning_rate,
        }
        print(
            f"settings: Llama hidden {args.hidden} x {args.layers} layers, byte-level tokenizer; "
            f"{args.prompts} prompts x {args.group_size} completions of up to {args.max_new_tokens} "
            f"tokens per step; T=1, top-p 1, top-k off; exact_match reward; one pass, one optimizer "
            f"step per rollout; beta 0 (no reference); group-std scaling; per-sequence loss mean; "
            f"fused AdamW lr {args.learning_rate} constant, clip 1.0; fp32; no gradient "
            f"checkpointing; logging every step; {args.threads} threads; {args.rounds} rounds of "
            f"{args.steps} steps per side, the first {args.warmup} of each not timed",
            flush=True,
        )
        times: dict[str, list[float]] = {"ours": [], "trl": []}
        version = ""
        for round_index in range(args.rounds):
            for name in ("ours", "trl"):
                result = side(name, {**settings, "round": round_index}, args.threads)
                version = result.get("version", version)
                gaps = step_times(result["step_ends"], args.warmup)
                times[name] += gaps
                print(
                    f"round {round_index + 1} {name:<4} {1 / statistics.median(gaps):7.3f} steps/s",
                    flush=True,
                )
    ours_rate = 1 / statistics.median(times["ours"])
    trl_rate = 1 / statistics.median(times["trl"])
    print(f"kubealign grpo      {ours_rate:8.3f} steps/s (median of {len(times['ours'])} steps)")
    print(f"TRL {version:<7} GRPO  {trl_rate:8.3f} steps/s (median of {len(times['trl'])} steps)")
    print(f"ratio {ours_rate / trl_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
