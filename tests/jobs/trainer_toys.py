"""Tiny, fully local building blocks for the trainer-stage tests.

A byte-level BPE tokenizer trained on a few hundred generated sentences, a 2-layer Llama with
hidden size 32 built from a config, small JSONL datasets, and a helper that runs a stage as
``python -m kubealign_jobs.<stage> --config ...`` in a subprocess and parses its JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import model as models

SUBJECTS = ("the movie", "the plot", "the cast", "the ending", "the music", "the story")
GOOD = ("great", "good", "lovely", "charming", "wonderful")
BAD = ("bad", "dull", "awful", "boring", "painful")
TINY_LLAMA = {
    "arch": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
TINY_GPT2 = {"arch": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}


def sentences(count: int, *, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        word = rng.choice(GOOD + BAD)
        out.append(f"{rng.choice(SUBJECTS).capitalize()} was {word} and {rng.choice(SUBJECTS)} was {word}.")
    return out


def sft_rows(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"prompt": f"Review {rng.choice(SUBJECTS)}:", "completion": f" it was {rng.choice(GOOD)}."}
        for _ in range(count)
    ]


def preference_rows(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Review {rng.choice(SUBJECTS)}:",
            "chosen": f" it was {rng.choice(GOOD)}.",
            "rejected": f" it was {rng.choice(BAD)}.",
        }
        for _ in range(count)
    ]


def ranked_rows(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Review {rng.choice(SUBJECTS)}:",
            "responses": [
                f" it was {rng.choice(GOOD)} and {rng.choice(GOOD)}.",
                f" it was {rng.choice(GOOD)}.",
                f" it was {rng.choice(BAD)}.",
            ],
        }
        for _ in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_tiny_lm(dest: Path, *, spec: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A tokenizer trained on the toy sentences and a freshly initialised tiny causal LM."""
    import torch

    texts = sentences(300, seed=seed) + [r["completion"] for r in sft_rows(50)]
    tokenizer = models.train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(seed)
    lm = models.build_causal_lm(dict(spec or TINY_LLAMA), tokenizer=tokenizer)
    return models.save_pretrained(lm, tokenizer, dest)


@dataclass(frozen=True)
class StageRun:
    returncode: int
    records: list[dict[str, Any]]
    stderr: str
    termination: dict[str, Any] | None

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "event" not in r and "step" in r]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == name]


def stage_config(
    tmp: Path,
    *,
    stage_type: str,
    output: str,
    inputs: dict[str, Any],
    hyperparameters: dict[str, Any],
    **extra: Any,
) -> Path:
    doc = {
        "apiVersion": "kubealign.io/v1alpha1",
        "kind": "StageConfig",
        "run": "toy",
        "stage": f"{stage_type}-toy",
        "type": stage_type,
        "output": output,
        "inputs": inputs,
        "hyperparameters": hyperparameters,
        **extra,
    }
    path = tmp / f"{stage_type}-{len(list(tmp.glob('*.json')))}.json"
    path.write_text(json.dumps(doc))
    return path


def stage_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KUBEALIGN_TERMINATION_LOG": str(tmp / "termination-log"),
            "KUBEALIGN_SCRATCH": str(tmp / "scratch"),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def parse_records(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def run_stage(
    stage_type: str, config: Path, tmp: Path, *, env: dict[str, str] | None = None, timeout: float = 300
) -> StageRun:
    termination = tmp / "termination-log"
    termination.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", f"kubealign_jobs.{stage_type}", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=stage_env(tmp, env),
        check=False,
    )
    message = json.loads(termination.read_text()) if termination.exists() else None
    return StageRun(proc.returncode, parse_records(proc.stdout), proc.stderr, message)


def run_until_checkpoint(
    stage_type: str, tmp: Path, config: Path, step: int, *, ready: Callable[[], bool] | None = None
) -> int:
    """Start a stage and SIGKILL it, torchrun workers included, once checkpoint ``step`` is published
    (or, with ``ready``, the first checkpoint from ``step`` on at which ``ready()`` holds); the
    step of that checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"kubealign_jobs.{stage_type}", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=stage_env(tmp),
        start_new_session=True,
    )
    assert proc.stdout is not None
    reached = 0
    try:
        for line in proc.stdout:
            records = parse_records(line)
            if not records or records[0].get("event") != "checkpoint":
                continue
            reached = int(records[0]["step"])
            if reached >= step and (ready is None or ready()):
                break
        else:
            pytest.fail(f"the stage ended before checkpoint {step}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # torchrun's workers may sit in process groups of their own: kill every process of this run.
        for pid in processes_with(str(config)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while processes_with(str(config)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_with(str(config)), "the killed stage left processes behind"
    return reached


def processes_with(needle: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
