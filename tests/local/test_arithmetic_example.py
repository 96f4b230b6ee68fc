"""examples/arithmetic without running it: the data match their generator and hold out their
problems, the manifest is valid and its inputs exist, and report.py's statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kubealign import api
from kubealign.local import load_manifest, localize, missing_inputs
from tests.local.runner_toys import load_script, make_data_check

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "arithmetic"


def load_report() -> ModuleType:
    return load_script(EXAMPLE / "report.py", "arithmetic_report")


def test_committed_data_is_generated_and_held_out_problems_are_never_trained_on() -> None:
    result = make_data_check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    rows = {
        name: [json.loads(line) for line in (EXAMPLE / "data" / name).read_text().splitlines()]
        for name in ("sft.jsonl", "prompts.jsonl", "eval.jsonl")
    }
    held_out = {r["prompt"] for r in rows["eval.jsonl"]}
    assert len(held_out) == 300
    corpus = {line.split("=")[0] + "=" for line in (EXAMPLE / "data" / "corpus.txt").read_text().splitlines()}
    for trained in (
        corpus,
        {r["prompt"] for r in rows["sft.jsonl"]},
        {r["prompt"] for r in rows["prompts.jsonl"]},
    ):
        assert trained.isdisjoint(held_out)
    # Every answer is right.
    for row in rows["eval.jsonl"]:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", row["prompt"]).groups()  # type: ignore[union-attr]
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_manifest_is_valid_and_its_inputs_exist(tmp_path: Path) -> None:
    path = EXAMPLE / "alignmentrun.yaml"
    manifest, document = load_manifest(path)
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=EXAMPLE, workdir=tmp_path)
    assert missing_inputs(run, document, path) == []
    members = run.spec.members("grpo")
    assert [m.seed for m in members] == [0, 1, 2, 3, 4]
    assert all(m.hyperparameters["verifiers"] == {"exact_match": 1.0} for m in members)
    assert all(m.inputs.eval_data is not None for m in members)


def status(rows: list[tuple[int, float, float]]) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": f"grpo-seed-{seed}",
                "type": "grpo",
                "phase": "Succeeded",
                "sweep": {"stage": "grpo", "values": {"seed": seed}},
                "metrics": {"eval_reward_initial": sft, "eval_reward": grpo, "eval_prompts": 300},
            }
            for seed, sft, grpo in rows
        ]
    }


def test_report_gives_the_mean_gain_and_a_bootstrap_interval_over_seeds() -> None:
    report = load_report()
    gains = [0.03, 0.05, 0.02, 0.04, 0.01]
    results = report.summarize(status([(seed, 0.5, 0.5 + gain) for seed, gain in enumerate(gains)]))
    gain = results["gain"]
    assert gain["mean"] == pytest.approx(0.03)
    low, high = gain["ci95"]
    # Inside the range of the seeds' gains, around the mean, narrower than the range.
    assert 0.01 <= low < 0.03 < high <= 0.05 and high - low < 0.04
    # Percentile bootstrap of 5 values: about mean -+ 1.96 * sd / sqrt(n) * sqrt((n-1)/n) = -+0.0124.
    assert low == pytest.approx(0.03 - 0.0124, abs=0.003) and high == pytest.approx(0.03 + 0.0124, abs=0.003)
    assert report.interval(gains) == report.interval(gains)  # a fixed RNG: the same interval each time
    assert results["seeds_improved"] == 5
    assert results["checks"]["at_least_5_seeds"] is True
    four = status([(seed, 0.5, 0.5 + gain) for seed, gain in enumerate(gains[:4])])
    assert report.summarize(four)["checks"]["at_least_5_seeds"] is False
    with pytest.raises(SystemExit, match="not finished"):
        unfinished = status([(0, 0.5, 0.5)])
        unfinished["stages"][0]["phase"] = "Running"
        report.summarize(unfinished)
