"""examples/sentiment without running it: the data match their generator, the manifest is valid and
its inputs exist, and plot.py's summary applies the acceptance checks. (The full run takes minutes;
examples/sentiment/README.md records a measured one.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kubealign import api
from kubealign.local import load_manifest, localize, missing_inputs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sentiment"


def load_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sentiment_plot", EXAMPLE / "plot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_data_is_what_the_grammar_generates() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    total = sum(path.stat().st_size for path in (EXAMPLE / "data").iterdir())
    assert total < 500_000, f"the example's data grew to {total} bytes"


def test_manifest_is_valid_and_its_inputs_exist(tmp_path: Path) -> None:
    path = EXAMPLE / "alignmentrun.yaml"
    manifest, document = load_manifest(path)
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=EXAMPLE, workdir=tmp_path)
    assert missing_inputs(run, document, path) == []
    types = [stage.type for stage in run.spec.stages]
    assert types == ["pretrain", "sft", "generate", "reward", "dpo", "ppo", "evaluate"]
    # DPO and PPO both start from SFT, so they run side by side.
    dpo, ppo = run.spec.stage("dpo"), run.spec.stage("ppo")
    assert dpo.inputs.model == ppo.inputs.model == api.InputSource(from_stage="sft")


def cells(reward: float, kl: float) -> dict[str, dict[str, float]]:
    return {t: {"reward": reward, "kl": kl, "win_rate": 0.5, "n": 80.0} for t in ("0.5", "1.0")}


def report(*, dpo_reward: float, ppo_kl: float) -> dict[str, Any]:
    return {
        "judge": "vader",
        "prompts": 80,
        "policies": {"reference": cells(0.1, 0.0), "dpo": cells(dpo_reward, 3.0), "ppo": cells(0.6, ppo_kl)},
        "best_of_n": {"n": 4, "kl": 0.64, "selector": "reward_model", "temperatures": cells(0.5, 0.64)},
    }


@pytest.mark.parametrize(
    ("dpo_reward", "ppo_kl", "passed"), [(0.8, 2.0, True), (0.05, 2.0, False), (0.8, 0.0, False)]
)
def test_summary_checks_that_dpo_and_ppo_beat_sft(dpo_reward: float, ppo_kl: float, passed: bool) -> None:
    plot = load_plot()
    results = plot.summarize(plot.named(report(dpo_reward=dpo_reward, ppo_kl=ppo_kl)))
    assert list(results["policies"]) == ["sft", "dpo", "ppo", "best_of_4"]
    assert results["passed"] is passed
    assert results["checks"]["dpo_reward_above_sft"] is (dpo_reward > 0.1)
    assert results["checks"]["ppo_kl_positive"] is (ppo_kl > 0)
    table = plot.table(results)
    assert table[2] == "| sft | 0.50 | 0.100 | 0.00 | 0.50 |"
    assert len(table) == 2 + 4 * 2
