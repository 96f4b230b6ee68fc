"""The stage runner's pure parts: hyperparameter checking, the termination message, config loading."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import loop, runtime, storage
from kubealign_jobs.config import ConfigError


@dataclass(frozen=True)
class Toy:
    rate: float = 0.1
    steps: int = 3
    flag: bool = False
    name: str = "x"
    maybe: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)


def test_hyperparameters_are_checked_by_name_and_type() -> None:
    parsed = runtime.parse_hyperparameters(Toy, {"rate": 1, "steps": 5, "maybe": "y", "sizes": [1, 2]})
    assert parsed == Toy(rate=1.0, steps=5, maybe="y", sizes=[1, 2])
    assert isinstance(parsed.rate, float)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rat": 1.0}, r"hyperparameters\.rat: unknown hyperparameter for this stage \(known: flag, maybe"),
        ({"steps": 2.5}, r"hyperparameters\.steps: expected an integer, got 2\.5"),
        ({"steps": True}, r"hyperparameters\.steps: expected an integer, got True"),
        ({"flag": "yes"}, r"hyperparameters\.flag: expected true or false, got 'yes'"),
        ({"rate": "fast"}, r"hyperparameters\.rate: expected a number, got 'fast'"),
        ({"maybe": 3}, r"hyperparameters\.maybe: expected a string, got 3"),
        ({"spec": [1]}, r"hyperparameters\.spec: expected an object"),
        ({"sizes": [1, "a"]}, r"hyperparameters\.sizes\[1\]: expected an integer"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            runtime.parse_hyperparameters(Toy, values)


def test_training_hyperparameters_validate_ranges() -> None:
    with pytest.raises(ConfigError, match=r"hyperparameters\.batch_size: must be >= 1, got 0"):
        runtime.parse_hyperparameters(loop.TrainingHyperparameters, {"batch_size": 0})
    with pytest.raises(ConfigError, match=r"hyperparameters\.lr_schedule: 'step' is not one of cosine"):
        runtime.parse_hyperparameters(loop.TrainingHyperparameters, {"lr_schedule": "step"})
    hp = loop.TrainingHyperparameters(batch_size=8, micro_batch_size=2)
    assert loop.micro_batch_size(hp, 2) == 2
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        loop.micro_batch_size(hp, 3)


def test_lr_schedule_warmup_then_decay() -> None:
    hp = loop.TrainingHyperparameters(warmup_steps=2, min_lr_ratio=0.1, lr_schedule="cosine")
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
    code = runtime.run_stage(
        "sft", lambda ctx, hp: {}, loop.TrainingHyperparameters, ["--config", str(config)]
    )
    assert code == runtime.EXIT_BAD_INPUT
    assert "type: this is the 'sft' trainer, the config is for 'dpo'" in capsys.readouterr().err


def test_torchrun_command_uses_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29400", "NODE_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    command = runtime._torchrun_command("kubealign_jobs.dpo", ["--config", "c.json"], 2, 8)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=job-0.svc"} <= set(command)
    assert command[-4:] == ["-m", "kubealign_jobs.dpo", "--config", "c.json"]
