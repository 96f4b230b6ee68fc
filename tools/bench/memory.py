#!/usr/bin/env python3
"""Peak memory per process for sft and dpo under DDP, FSDP2, LoRA and gradient checkpointing.

    .venv/bin/python tools/bench/memory.py                 # ~100M-parameter Llama, 256 tokens
    .venv/bin/python tools/bench/memory.py --hidden 256 --layers 4 --steps 3   # quick look
    .venv/bin/python tools/bench/memory.py --allocators mmap --skip-trl --wide 4 \
        --only "sft:DDP full:4,sft:FSDP full:4"                                 # two rows at 4 processes

Every row is a real stage process (``python -m kubealign_jobs.<stage>``, under torchrun for
two processes) training the same Llama built from a config and saved once, on the same rows,
for ``--steps`` optimizer steps. Peak resident memory is the largest ``ru_maxrss`` over the
stage's processes (``RUSAGE_CHILDREN`` of a fresh runner per row), so it counts everything a
user's pod holds: the loaded weights, the reference pass, optimizer state, checkpoint writing
and the artifact. Steps/s is the median of the stage's own per-step records after the first.
Every row runs under each ``--allocators`` setting of the C allocator (see ``ALLOCATORS``): under
glibc's defaults resident memory on CPU holds heap fragmentation besides live tensors.

TRL 1.16's DPOTrainer with peft runs on the same model, rows, LoRA settings (r, alpha,
all-linear), sequence length, batch, fp32, fused AdamW, constant learning rate, gradient
clipping at 1.0 and no gradient checkpointing (TRL's default is on: switched off for both),
with its reference log-probs precomputed (its fastest setting; kubealign precomputes too).
TRL tokenises with its own chat-free template, so its sequences may differ from kubealign's by
a special token or two. It is installed with ``pip install --no-deps --target`` into
``--trl-dir``.

Prints the settings, one table row per configuration, then the ratios the targets name:
FSDP-2 peak / DDP-2 peak (target <= 0.6) and kubealign LoRA dpo peak / TRL + peft peak
(target <= 1.0) with both steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import CACHE, TRL_VERSION, install_trl

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT / "examples" / "sentiment" / "data" / "corpus.txt"
# The C allocator of every process (kubealign's and TRL's alike). glibc's default raises its mmap
# threshold as large blocks are freed (up to 32 MiB), so the 1-30 MiB tensors of a training step
# land on the heap, whose freed holes are kept: resident memory then measures fragmentation as
# much as live tensors. A fixed 128 KiB threshold serves every large tensor from mmap and hands it
# back to the kernel when freed, so the peak is what is live (at a cost in page faults).
ALLOCATORS: dict[str, dict[str, str]] = {
    "glibc": {},
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
}


@dataclass(frozen=True)
class Row:
    stage: str
    name: str
    processes: int
    hyperparameters: dict[str, Any]


def rows(lora: dict[str, Any], wide: list[int]) -> list[Row]:
    """Every configuration at 2 processes, and DDP against FSDP at each of ``wide`` processes."""
    out = []
    for stage in ("sft", "dpo"):
        out += [
            Row(stage, "DDP full", 2, {}),
            Row(stage, "FSDP full", 2, {"sharding": "fsdp"}),
            Row(stage, "DDP + grad ckpt", 2, {"gradient_checkpointing": True}),
            Row(stage, "LoRA (DDP)", 2, {"lora": lora}),
            Row(stage, "LoRA + FSDP", 2, {"lora": lora, "sharding": "fsdp"}),
        ]
        for processes in wide:
            out += [
                Row(stage, "DDP full", processes, {}),
                Row(stage, "FSDP full", processes, {"sharding": "fsdp"}),
            ]
    out.append(Row("dpo", "LoRA, 1 process", 1, {"lora": lora}))
    return out


# ---------------------------------------------------------------------------- setup


def build_inputs(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubealign_jobs import model as models

    lines = CORPUS.read_text().splitlines()
    tokenizer = models.train_tokenizer(lines, vocab_size=4000)
    torch.manual_seed(0)
    config = LlamaConfig(  # type: ignore[no-untyped-call]
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(8 * args.hidden / 3 // 64 * 64),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=2 * args.length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model_dir = models.save_pretrained(lm, tokenizer, workdir / "model")
    rng = random.Random(0)

    def text(words: int) -> str:
        out: list[str] = []
        while len(" ".join(out).split()) < words:
            out.append(rng.choice(lines))
        return " ".join(out)

    # Prompts of ~1/4 and answers of ~3/4 of --length tokens (about one token per word here).
    prompt_words, answer_words = args.length // 4, 3 * args.length // 4
    count = args.batch_size * (args.steps + 1)
    sft = [{"prompt": text(prompt_words), "completion": " " + text(answer_words)} for _ in range(count)]
    prefs = [
        {
            "prompt": text(prompt_words),
            "chosen": " " + text(answer_words),
            "rejected": " " + text(answer_words),
        }
        for _ in range(count)
    ]
    paths = {"model": model_dir, "sft": workdir / "sft.jsonl", "dpo": workdir / "prefs.jsonl"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    paths["dpo"].write_text("".join(json.dumps(r) + "\n" for r in prefs))
    print(
        f"model: Llama, {models.count_parameters(lm) / 1e6:.1f}M parameters (hidden {args.hidden}, "
        f"{args.layers} layers, MLP {config.intermediate_size}, vocab {args.vocab}, tied embeddings)"
    )
    return paths


def measure(command: list[str], env: dict[str, str]) -> tuple[int, float, str, str]:
    """Run ``command`` in a fresh runner process; its exit code, peak RSS (MiB) of any descendant."""
    runner = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "print(json.dumps({'rc': p.returncode, 'peak_kib': peak, 'out': p.stdout, 'err': p.stderr[-3000:]}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", runner, *command], capture_output=True, text=True, env=env, check=True
    )
    result = json.loads(proc.stdout)
    return int(result["rc"]), result["peak_kib"] / 1024, result["out"], result["err"]


def stage_env(workdir: Path, allocator: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE"):
        env.pop(key, None)
    for key in ALLOCATORS["mmap"]:
        env.pop(key, None)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "KUBEALIGN_SCRATCH": str(workdir / "scratch"),
            # This tree's trainer, whichever tree the environment was installed from.
            "PYTHONPATH": os.pathsep.join((str(REPO_ROOT / "jobs"), str(REPO_ROOT))),
            **ALLOCATORS[allocator],
        }
    )
    return env


def run_kubealign(
    args: argparse.Namespace, row: Row, paths: dict[str, Path], workdir: Path, index: int, *, allocator: str
) -> dict[str, Any]:
    common = {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.length,
        "learning_rate": 1e-4,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "log_every": 1,
        "checkpoint_every": 0,
        "mixed_precision": "no",
    }
    if row.stage == "dpo":
        common["beta"] = 0.1
    config = {
        "apiVersion": "kubealign.io/v1alpha1",
        "kind": "StageConfig",
        "run": "bench",
        "stage": f"{row.stage}-{index}",
        "type": row.stage,
        "output": f"file://{workdir}/out-{allocator}-{index}",
        "inputs": {"model": str(paths["model"]), "data": str(paths[row.stage])},
        "hyperparameters": {**common, **row.hyperparameters},
        "distributed": {"nnodes": 1, "nproc_per_node": row.processes},
    }
    path = workdir / f"config-{allocator}-{index}.json"
    path.write_text(json.dumps(config))
    rc, peak, out, err = measure(
        [sys.executable, "-m", f"kubealign_jobs.{row.stage}", "--config", str(path)],
        stage_env(workdir, allocator),
    )
    if rc:
        raise SystemExit(f"{row.stage} {row.name} failed:\n{err}")
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rates = [r["steps_per_s"] for r in records if "event" not in r and r.get("steps_per_s")][1:]
    estimate: dict[str, Any] = next((r for r in records if r.get("event") == "memory_estimate"), {})
    lora = next((r for r in records if r.get("event") == "lora"), None)
    return {
        "peak_mib": peak,
        "steps_per_s": statistics.median(rates) if rates else float("nan"),
        "estimate_mib": estimate.get("memory_estimate_bytes", float("nan")) / 2**20,
        "trainable": lora["trainable_parameters"] if lora else None,
    }


# ---------------------------------------------------------------------------- TRL


TRL_SCRIPT = r"""
import json, statistics, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
import trl
from trl import DPOConfig, DPOTrainer

args = json.loads(sys.argv[1])
torch.manual_seed(0)
rows = [json.loads(line) for line in open(args["data"])]
tokenizer = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
ends = []

class Clock(TrainerCallback):
    def on_step_end(self, *a, **k):
        ends.append(time.perf_counter())

config = DPOConfig(
    output_dir=args["out"], per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=args["length"],
    optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, precompute_ref_log_probs=True,
    dataloader_num_workers=0, seed=0,
)
peft_config = LoraConfig(r=args["r"], lora_alpha=args["alpha"], lora_dropout=0.0, target_modules="all-linear")
trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                     processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
trainer.train()
intervals = [b - a for a, b in zip(ends, ends[1:])]
print(json.dumps({"steps_per_s": 1 / statistics.median(intervals), "version": trl.__version__}))
"""


def run_trl(
    args: argparse.Namespace, paths: dict[str, Path], workdir: Path, lora: dict[str, Any], *, allocator: str
) -> dict[str, Any] | None:
    trl_dir = install_trl(TRL_VERSION, Path(args.trl_dir))
    env = stage_env(workdir, allocator)
    env["PYTHONPATH"] = f"{trl_dir}{os.pathsep}{env['PYTHONPATH']}"
    settings = {
        "model": str(paths["model"]),
        "data": str(paths["dpo"]),
        "out": str(workdir / "trl-out"),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "length": args.length,
        "r": lora["r"],
        "alpha": lora["alpha"],
    }
    rc, peak, out, err = measure([sys.executable, "-c", TRL_SCRIPT, json.dumps(settings)], env)
    if rc:
        print(f"TRL {TRL_VERSION} failed:\n{err}")
        return None
    result = json.loads(out.strip().splitlines()[-1])
    return {"peak_mib": peak, "steps_per_s": result["steps_per_s"], "version": result["version"]}


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (sft) or pairs (dpo) per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--trl-dir", default=str(CACHE / f"trl-{TRL_VERSION}"))
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--allocators",
        default="glibc,mmap",
        help=f"C allocator settings to measure under, of {', '.join(ALLOCATORS)} (every row runs under each)",
    )
    parser.add_argument(
        "--wide",
        default="",
        help="also DDP and FSDP at these process counts, comma-separated (e.g. 4: FSDP's share of the "
        "model state shrinks with the count; the batch must divide by it)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="measure only these rows, as stage:configuration:processes, comma-separated "
        "(e.g. 'sft:FSDP full:4')",
    )
    args = parser.parse_args()
    allocators = args.allocators.split(",")
    wide = [int(n) for n in args.wide.split(",") if n]
    if unknown := set(allocators) - set(ALLOCATORS):
        parser.error(f"--allocators: unknown {', '.join(sorted(unknown))}")
    lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": "all-linear"}

    described = ", ".join(f"{name} {ALLOCATORS[name] or '(defaults)'}" for name in allocators)
    results: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    trl: dict[str, dict[str, Any] | None] = {}
    with tempfile.TemporaryDirectory(prefix="kubealign-memory-") as tmp:
        workdir = Path(tmp)
        paths = build_inputs(args, workdir)
        print(
            f"settings: {args.length} tokens per sequence, batch {args.batch_size} "
            f"(micro-batch = batch / processes), {args.steps} steps, fp32 on CPU, fused AdamW, "
            "lr 1e-4 constant, grad clip 1.0, one torch thread per process, "
            f"LoRA r={lora['r']} alpha={lora['alpha']} all-linear, no checkpoints during training; "
            f"allocators: {described}"
        )
        print(
            f"{'alloc':<6} {'stage':<5} {'configuration':<18} {'procs':>5} {'peak MiB/proc':>14} "
            f"{'estimate MiB':>13} {'steps/s':>8}"
        )
        for allocator in allocators:
            for index, row in enumerate(rows(lora, wide)):
                if args.only and f"{row.stage}:{row.name}:{row.processes}" not in args.only.split(","):
                    continue
                result = run_kubealign(args, row, paths, workdir, index, allocator=allocator)
                results[(allocator, row.stage, row.name, row.processes)] = result
                print(
                    f"{allocator:<6} {row.stage:<5} {row.name:<18} {row.processes:>5} "
                    f"{result['peak_mib']:>14.0f} {result['estimate_mib']:>13.0f} "
                    f"{result['steps_per_s']:>8.3f}",
                    flush=True,
                )
            trl[allocator] = (
                None if args.skip_trl else run_trl(args, paths, workdir, lora, allocator=allocator)
            )
            found = trl[allocator]
            if found is not None:
                name = f"TRL {found['version']} + peft"
                print(
                    f"{allocator:<6} {'dpo':<5} {name:<18} {1:>5} {found['peak_mib']:>14.0f} {'':>13} "
                    f"{found['steps_per_s']:>8.3f}",
                    flush=True,
                )

    print()
    for allocator in allocators:
        for stage in ("sft", "dpo"):
            for n in [2, *wide]:
                ddp = results.get((allocator, stage, "DDP full", n))
                fsdp = results.get((allocator, stage, "FSDP full", n))
                if ddp is None or fsdp is None:
                    continue
                print(
                    f"{allocator}: {stage}: FSDP-{n} / DDP-{n} peak per process = "
                    f"{fsdp['peak_mib'] / ddp['peak_mib']:.2f} (target <= 0.6), steps/s "
                    f"{fsdp['steps_per_s']:.3f} vs {ddp['steps_per_s']:.3f}"
                )
        found = trl[allocator]
        mine = results.get((allocator, "dpo", "LoRA, 1 process", 1))
        if found is not None and mine is not None:
            print(
                f"{allocator}: dpo: kubealign LoRA / TRL + peft peak = "
                f"{mine['peak_mib'] / found['peak_mib']:.2f} (target <= 1.0), "
                f"steps/s {mine['steps_per_s']:.3f} vs {found['steps_per_s']:.3f} "
                f"(ratio {mine['steps_per_s'] / found['steps_per_s']:.2f})"
            )


if __name__ == "__main__":
    main()
