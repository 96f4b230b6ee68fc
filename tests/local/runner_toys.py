"""Helpers for the local tests: tiny data and base model, manifests, the CLI, examples' scripts.

The stages are real (``python -m kubealign_jobs.sft`` training a 2-layer, hidden-32 Llama for a
few steps); only their size is small, so each stage costs about as much as starting torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

TINY_LLAMA = {
    "arch": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
WORDS = ("the movie was good", "the plot was dull", "a lovely cast", "an awful ending", "great music")


@dataclass(frozen=True)
class Workspace:
    """A folder with a base model (``base/``) and SFT rows (``sft.jsonl``) that manifests refer to."""

    root: Path

    def manifest(
        self, name: str, stages: Sequence[dict[str, Any]], *, storage: str = "file:///unused"
    ) -> Path:
        """Write an AlignmentRun with these stages next to the data; inputs may use file://./ paths."""
        doc = {
            "apiVersion": "kubealign.io/v1alpha1",
            "kind": "AlignmentRun",
            "metadata": {"name": name},
            "spec": {
                "image": "kubealign/trainer:test",
                "storage": {"uri": storage},
                "stages": list(stages),
            },
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path


def sft_stage(name: str, *, model: dict[str, str], steps: int, **extra: Any) -> dict[str, Any]:
    """An sft stage on the workspace's rows; ``extra`` goes into its hyperparameters."""
    return {
        "name": name,
        "type": "sft",
        "inputs": {"model": model, "data": {"uri": "file://./sft.jsonl"}},
        "hyperparameters": {
            "max_steps": steps,
            "batch_size": 4,
            "log_every": 1,
            "learning_rate": 1e-3,
            "max_length": 32,
            **extra,
        },
    }


def make_workspace(root: Path) -> Workspace:
    """SFT rows, a tokenizer trained on them and a freshly initialised tiny Llama saved like a stage's
    artifact folder; the model is built in a subprocess so the test process never loads torch."""
    rng = random.Random(0)
    rows = [{"prompt": "Review:", "completion": " " + rng.choice(WORDS) + "."} for _ in range(32)]
    (root / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build = (
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from kubealign_jobs import model as models\n"
        "texts = [json.loads(line)['completion'] for line in open(sys.argv[1])] * 4\n"
        "tokenizer = models.train_tokenizer(texts, vocab_size=300)\n"
        "torch.manual_seed(0)\n"
        "lm = models.build_causal_lm(json.loads(sys.argv[3]), tokenizer=tokenizer)\n"
        "models.save_pretrained(lm, tokenizer, Path(sys.argv[2]))\n"
    )
    subprocess.run(
        [sys.executable, "-c", build, str(root / "sft.jsonl"), str(root / "base"), json.dumps(TINY_LLAMA)],
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return Workspace(root)


def kubealign(*args: str | Path) -> list[str]:
    """The ``kubealign`` command line, run with this interpreter."""
    return [sys.executable, "-m", "kubealign.cli", *map(str, args)]


def load_script(path: Path, name: str) -> ModuleType:
    """An example's script (plot.py, report.py) imported as module ``name``, without running main."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_data_check(example: Path) -> subprocess.CompletedProcess[str]:
    """``make_data.py --check`` of an example: do the committed files match their generator?"""
    return subprocess.run(
        [sys.executable, str(example / "make_data.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
