"""The stage runner's pure parts: batch sizes, the LR schedule, the termination message, config loading."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kubealign_jobs import loop, runtime, storage
from kubealign_jobs.config import EXIT_BAD_INPUT, ConfigError
from kubealign_jobs.stages import TrainingHyperparameters


def test_micro_batch_size_divides_the_per_process_batch() -> None:
    hp = TrainingHyperparameters(batch_size=8, micro_batch_size=2)
    assert loop.micro_batch_size(hp, 2) == 2
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        loop.micro_batch_size(hp, 3)


def test_lr_schedule_warmup_then_decay() -> None:
    hp = TrainingHyperparameters(warmup_steps=2, min_lr_ratio=0.1, lr_schedule="cosine")
    factors = [loop.lr_factor(step, hp=hp, total=12) for step in range(13)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0) and factors[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))


def test_termination_message_stays_valid_json_under_4kb() -> None:
    record = {
        "status": "failed",
        "stage": "dpo",
        "error": "x" * 10_000,
        **{f"metric_{i}": float(i) for i in range(500)},
    }
    text = runtime.compact_message(record)
    assert len(text.encode()) <= 4096
    parsed = json.loads(text)
    assert parsed["status"] == "failed" and parsed["stage"] == "dpo" and parsed["truncated"] is True
    assert parsed["error"].startswith("xxx") and parsed["error"].endswith("...")
    small = {"status": "succeeded", "loss": 0.5}
    assert json.loads(runtime.compact_message(small)) == small


def test_termination_message_written_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv(runtime.TERMINATION_ENV, str(target))
    runtime.write_termination_message({"status": "succeeded", "eval_accuracy": 0.75})
    assert json.loads(target.read_text()) == {"status": "succeeded", "eval_accuracy": 0.75}


@pytest.mark.s3
def test_config_from_s3_uri_and_clear_errors(bucket: str, tmp_path: Path) -> None:
    doc = {"run": "r", "stage": "sft-1", "type": "sft", "output": f"s3://{bucket}/out"}
    storage.write_text(f"s3://{bucket}/stage.json", json.dumps(doc))
    assert runtime.load_config(f"s3://{bucket}/stage.json").stage == "sft-1"
    with pytest.raises(ConfigError, match=r"--config: .* does not exist"):
        runtime.load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        runtime.load_config(str(tmp_path / "bad.json"))


def test_wrong_stage_type_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "stage.json"
    config.write_text(json.dumps({"run": "r", "stage": "s", "type": "dpo", "output": str(tmp_path / "out")}))
    code = runtime.run_stage("sft", lambda ctx, hp: {}, ["--config", str(config)])
    assert code == EXIT_BAD_INPUT
    assert "type: this is the 'sft' trainer, the config is for 'dpo'" in capsys.readouterr().err


def test_torchrun_command_uses_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29400", "NODE_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    command = runtime._torchrun_command("kubealign_jobs.dpo", ["--config", "c.json"], 2, 8)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=job-0.svc"} <= set(command)
    assert command[-4:] == ["-m", "kubealign_jobs.dpo", "--config", "c.json"]
