"""The evaluate stage: win rate and KL of a policy against itself, Best-of-N, S3, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import evaluate, storage
from kubealign_jobs.evaluate import best_of_n_kl, temperature_key, win_rate
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, write_jsonl
from tests.jobs.trainer_toys import run_stage, stage_config


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate([0.3] * 5, [0.3] * 5) == 0.5
    with pytest.raises(ValueError, match="2 scores against 1"):
        win_rate([1.0, 2.0], [1.0])


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n() -> None:
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(128) == pytest.approx(math.log(128) - 127 / 128)


def test_temperature_keys_are_stable_strings() -> None:
    assert [temperature_key(t) for t in (0, 0.25, 1)] == ["0.0", "0.25", "1.0"]


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "reference": save_toy_policy(root / "reference", seed=21),
        "other": save_toy_policy(root / "other", seed=22, initializer_range=0.5),
    }


def test_evaluate_through_s3_self_comparison_best_of_n_and_resume(
    bucket: str, s3: Any, toy_models: dict[str, Path], tmp_path: Path
) -> None:
    base = f"s3://{bucket}/inputs"
    storage.publish_dir(toy_models["reference"], f"{base}/reference")
    # The same weights again under another name: the policy-against-itself control.
    storage.publish_dir(toy_models["reference"], f"{base}/same")
    storage.publish_dir(toy_models["other"], f"{base}/other")
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in PROMPTS * 8])
    storage.write_bytes(f"{base}/eval.jsonl", prompts.read_bytes())
    inputs = {
        "reference": f"{base}/reference",
        "eval_data": f"{base}/eval.jsonl",
        "policies": {"same": f"{base}/same", "other": f"{base}/other"},
    }
    output = f"s3://{bucket}/ns/run/evaluate"
    hyperparameters = {
        "scorer": "word_fraction",
        "scorer_options": {"words": ["good", "great", "fine"]},
        "temperatures": [0.5, 1.0],
        "max_new_tokens": 6,
        "best_of_n": 4,
    }
    config = stage_config(
        tmp_path, stage_type="evaluate", output=output, inputs=inputs, hyperparameters=hyperparameters
    )
    run = run_stage("evaluate", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["policy"] for r in run.steps] == ["reference", "other", "same"]

    artifact = storage.fetch_dir(f"{output}/artifact", tmp_path / "artifact", require_manifest=True)
    results = storage.read_json(str(artifact / "results.json"))
    assert (artifact / "frontier.png").stat().st_size > 1000
    assert set(results["policies"]) == {"reference", "same", "other"}
    for cells in results["policies"].values():
        assert set(cells) == {"0.5", "1.0"}
        for cell in cells.values():
            assert set(cell) == {"reward", "kl", "kl_mc", "win_rate", "n"} and cell["n"] == 64
    assert results["kl_method"] == "exact"
    for name, cells in results["per_answer"].items():
        for key, values in cells.items():
            assert set(values) == {"reward", "kl", "kl_mc"} and all(len(v) == 64 for v in values.values())
            assert sum(values["kl"]) / 64 == pytest.approx(results["policies"][name][key]["kl"])
    # Identical weights at temperature 1: every per-token KL is 0. Tempered to 0.5, the same
    # weights are another distribution, as far from the reference as the tempered reference is.
    assert results["policies"]["same"]["1.0"]["kl"] < 1e-6
    assert results["policies"]["reference"]["1.0"]["kl"] < 1e-6
    tempered = results["policies"]["reference"]["0.5"]["kl"]
    assert tempered > 0.01
    assert results["policies"]["same"]["0.5"]["kl"] == pytest.approx(tempered, rel=0.5)
    for key in ("0.5", "1.0"):
        same, other = results["policies"]["same"][key], results["policies"]["other"][key]
        # Independent samples of the same weights win about half the time.
        assert abs(same["win_rate"] - 0.5) < 0.15
        assert results["policies"]["reference"][key]["win_rate"] == 0.5
        # A different, peaked model is measurably far from the nearly uniform reference.
        assert other["kl"] > 0.5
        # Best-of-4 by the judge beats the reference's single answers.
        best = results["best_of_n"]["temperatures"][key]
        assert best["reward"] > results["policies"]["reference"][key]["reward"]
        assert best["win_rate"] > 0.5
    assert results["best_of_n"]["kl"] == pytest.approx(best_of_n_kl(4))
    assert results["best_of_n"]["kl_method"] == "analytic_bound"
    assert len(results["best_of_n"]["per_answer"]["1.0"]["reward"]) == 64
    same_kl = [results["policies"]["same"][key]["kl"] for key in ("0.5", "1.0")]
    assert run.termination is not None and run.termination["same/kl"] == pytest.approx(
        sum(same_kl) / 2, abs=1e-4
    )

    # A preemption while evaluating "same": the reference and "other" are not evaluated again.
    storage.delete_prefix(f"{output}/artifact")
    s3.delete_object(Bucket=bucket, Key="ns/run/evaluate/checkpoints/unit-0002/_MANIFEST.json")
    again = run_stage("evaluate", config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.events("resumed")[0]["done"] == ["reference", "other"]
    resumed = storage.read_json(f"{output}/artifact/results.json")
    assert resumed == results


def test_a_stage_without_a_judge_fails_naming_the_field(
    toy_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in PROMPTS])
    config = stage_config(
        tmp_path,
        stage_type="evaluate",
        output=str(tmp_path / "out"),
        inputs={"model": str(toy_models["reference"]), "data": str(prompts)},
        hyperparameters={"temperatures": [1.0, -1.0]},
    )
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEALIGN_TERMINATION_LOG", str(termination))
    monkeypatch.setenv("KUBEALIGN_SCRATCH", str(tmp_path / "scratch"))
    assert evaluate.main(["--config", str(config)]) == 2
    assert "hyperparameters.temperatures[1]: must be >= 0" in json.loads(termination.read_text())["error"]


def test_win_rate_against_the_datasets_answers(
    toy_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEALIGN_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("KUBEALIGN_SCRATCH", str(tmp_path / "scratch"))
    # The judge gives the dataset's answer "good" 1.0: a near-uniform policy rarely matches it.
    rows = [{"prompt": p, "completion": "good"} for p in PROMPTS * 4]
    eval_data = write_jsonl(tmp_path / "eval.jsonl", rows)
    hyperparameters = {
        "scorer": "word_fraction",
        "scorer_options": {"words": ["good"]},
        "temperatures": [1.0],
        "max_new_tokens": 4,
        "best_of_n": 0,
        "baseline": "data",
        "plot": False,
    }
    config = stage_config(
        tmp_path,
        stage_type="evaluate",
        output=str(tmp_path / "out"),
        inputs={"model": str(toy_models["reference"]), "eval_data": str(eval_data)},
        hyperparameters=hyperparameters,
    )
    assert evaluate.main(["--config", str(config)]) == 0
    results = json.loads((tmp_path / "out" / "artifact" / "results.json").read_text())
    assert results["baseline"] == "data" and "best_of_n" not in results
    cell = results["policies"]["reference"]["1.0"]
    assert cell["win_rate"] < 0.3
    # No answer can beat a 1.0; only answers scoring exactly 1.0 tie (1/2 each), and they are at most
    # a `reward` fraction of all answers.
    assert cell["win_rate"] <= 0.5 * cell["reward"] + 1e-9

    no_answers = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    bad = stage_config(
        tmp_path,
        stage_type="evaluate",
        output=str(tmp_path / "bad"),
        inputs={"model": str(toy_models["reference"]), "eval_data": str(no_answers)},
        hyperparameters=hyperparameters,
    )
    assert evaluate.main(["--config", str(bad)]) == 2
    error = json.loads((tmp_path / "termination-log").read_text())["error"]
    assert "hyperparameters.baseline=data needs each eval row's answer" in error
    assert "line 1" in error
