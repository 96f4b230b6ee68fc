"""examples/sentiment without running it: the data match their generator, the manifest is valid and
its inputs exist, and plot.py's summary applies the acceptance checks. (The full run takes minutes;
examples/sentiment/README.md records a measured one.)"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kubealign import api
from kubealign.local import load_manifest, localize, missing_inputs
from tests.local.runner_toys import load_script, make_data_check

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sentiment"


def load_plot() -> ModuleType:
    return load_script(EXAMPLE / "plot.py", "sentiment_plot")


def test_committed_data_is_what_the_grammar_generates() -> None:
    result = make_data_check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    total = sum(path.stat().st_size for path in (EXAMPLE / "data").iterdir())
    assert total < 500_000, f"the example's data grew to {total} bytes"


def test_manifest_is_valid_and_its_inputs_exist(tmp_path: Path) -> None:
    path = EXAMPLE / "alignmentrun.yaml"
    manifest, document = load_manifest(path)
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=EXAMPLE, workdir=tmp_path)
    assert missing_inputs(run, document, path) == []
    spec = run.spec
    counts = {
        name: len(spec.members(name))
        for name in ("pretrain", "sft", "generate", "preferred-ft", "reward", "dpo", "ppo", "evaluate")
    }
    # 5 seeds of the preference data; 4 values of beta and of the KL coefficient per seed.
    assert counts == {
        "pretrain": 1,
        "sft": 1,
        "generate": 5,
        "preferred-ft": 5,
        "reward": 5,
        "dpo": 20,
        "ppo": 20,
        "evaluate": 5,
    }
    # Both methods start from the same SFT model and sweep the same values of the same beta.
    for stage in (*spec.members("dpo"), *spec.members("ppo")):
        assert stage.inputs.model == api.InputSource(from_stage="sft")
    assert {s.hyperparameters["beta"] for s in spec.members("dpo")} == {
        s.hyperparameters["init_kl_coef"] for s in spec.members("ppo")
    }
    # Each seed's evaluation sees that seed's policies, its reward model, and nothing else.
    evaluate = spec.stage("evaluate-seed-3")
    assert evaluate.seed == 3
    assert evaluate.inputs.reward_model == api.InputSource(from_stage="reward-seed-3")
    policies = [p.from_stage or "" for p in evaluate.inputs.policies]
    assert len(policies) == 9 and all(p.endswith("-seed-3") for p in policies)
    assert spec.stage("dpo-beta-0p1-seed-3").inputs.data == api.InputSource(from_stage="generate-seed-3")


SEEDS = (0, 1, 2, 3, 4)
BETAS = (0.05, 0.1, 0.3, 1.0)
PROMPTS = 256


def fake_run(
    dpo_gain: float, seeds: tuple[int, ...] = SEEDS
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """A status and per-seed evaluate reports shaped like a real run's, with known per-answer values.

    A policy with KL coefficient b sits at KL 1/b; its reward rises with KL, DPO's by ``dpo_gain``
    more than PPO's at the same KL.
    """
    import numpy as np

    stages: list[dict[str, Any]] = []
    reports: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)

        def answers(reward: float, kl: float, rng: Any = rng) -> dict[str, Any]:
            values = {
                "reward": (reward + 0.1 * rng.standard_normal(PROMPTS)).tolist(),
                "kl": (kl + 0.2 * rng.standard_normal(PROMPTS)).clip(0).tolist(),
            }
            return {"0.5": values, "1.0": values}

        per_answer = {"reference": answers(0.0, 0.0), f"preferred-ft-seed-{seed}": answers(0.2, 0.5)}
        stages.append(
            {
                "name": f"preferred-ft-seed-{seed}",
                "type": "sft",
                "sweep": {"stage": "preferred-ft", "values": {"seed": seed}},
            }
        )
        for method, key, gain in (("dpo", "beta", dpo_gain), ("ppo", "init_kl_coef", 0.0)):
            for beta in BETAS:
                name = f"{method}-{key.replace('_', '-')}-{beta}-seed-{seed}"
                per_answer[name] = answers(0.1 * (1 / beta) ** 0.5 + gain, 1 / beta)
                stages.append(
                    {
                        "name": name,
                        "type": method,
                        "sweep": {"stage": method, "values": {key: beta, "seed": seed}},
                    }
                )
        stages.append(
            {
                "name": f"reward-seed-{seed}",
                "type": "reward",
                "metrics": {"eval_accuracy": 0.9},
                "sweep": {"stage": "reward", "values": {"seed": seed}},
            }
        )
        stages.append(
            {
                "name": f"evaluate-seed-{seed}",
                "type": "evaluate",
                "phase": "Succeeded",
                "output": f"file:///x/{seed}",
                "sweep": {"stage": "evaluate", "values": {"seed": seed}},
            }
        )
        reports[seed] = {
            "judge": "vader",
            "prompts": PROMPTS,
            "samples_per_prompt": 1,
            "kl_method": "exact",
            "per_answer": per_answer,
            "best_of_n": {"n": 4, "kl_method": "analytic_bound", "per_answer": answers(0.3, 0.64)},
        }
    return {"stages": stages}, reports


def test_the_frontier_has_every_setting_at_temperature_one_with_intervals() -> None:
    plot = load_plot()
    status, reports = fake_run(dpo_gain=0.1)
    results = plot.summarize(status, reports)
    frontier = results["frontier"]
    assert [(i["method"], i["value"]) for i in frontier] == [
        ("sft", None),
        ("preferred_ft", None),
        ("best_of_n", 4),
        *(("dpo", b) for b in BETAS),
        *(("ppo", b) for b in BETAS),
    ]
    for item in frontier:
        assert item["temperature"] == 1.0 and item["seeds"] == list(SEEDS) and item["prompts"] == PROMPTS
        assert item["kl_method"] == ("analytic_bound" if item["method"] == "best_of_n" else "exact")
        for quantity in ("reward", "kl", "win_rate"):
            low, high = item[f"{quantity}_ci95"]
            assert low <= item[f"{quantity}_mean"] <= high
    dpo = next(i for i in frontier if i["method"] == "dpo" and i["value"] == 0.1)
    assert dpo["hyperparameter"] == "beta"
    # Over 5 x 256 answers of std 0.1 the mean's 95% interval is about +-0.006 wide.
    assert 0.002 < dpo["reward_ci95"][1] - dpo["reward_ci95"][0] < 0.05
    assert dpo["kl_mean"] == pytest.approx(10.0, abs=0.05)
    assert len(results["temperature_sweep"]) == 2 * len(frontier)
    assert results["passed"] is True
    assert results["reward_model"]["held_out_accuracy_mean"] == pytest.approx(0.9)
    table = plot.table(results)
    assert len(table) == 2 + len(frontier) and "analytic bound" in table[4]


@pytest.mark.parametrize(("gain", "above"), [(0.1, True), (-0.1, False)])
def test_the_comparison_reports_which_frontier_lies_above(gain: float, above: bool) -> None:
    plot = load_plot()
    results = plot.summarize(*fake_run(dpo_gain=gain))
    compared = results["comparison"]
    assert compared["pooled"]["dpo_at_or_above"] is above
    assert compared["pooled"]["mean_reward_gap"] == pytest.approx(gain, abs=0.02)
    assert compared["seeds_compared"] == 5
    assert compared["seeds_dpo_at_or_above"] == (5 if above else 0)
    # Reported, not asserted: the method checks pass either way.
    assert results["passed"] is True


def test_too_few_seeds_fail_the_method_check() -> None:
    plot = load_plot()
    results = plot.summarize(*fake_run(dpo_gain=0.0, seeds=(0, 1, 2)))
    assert results["checks"]["at_least_5_seeds"] is False
    assert results["passed"] is False


def test_the_bootstrap_interval_covers_the_mean_and_narrows_with_data() -> None:
    import numpy as np

    plot = load_plot()
    rng = np.random.default_rng(0)
    small = plot.bootstrap(rng.normal(1.0, 1.0, size=(5, 64)), np.random.default_rng(1))
    large = plot.bootstrap(rng.normal(1.0, 1.0, size=(5, 1024)), np.random.default_rng(1))
    assert small[0] < 1.0 < small[1] and large[0] < 1.0 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    # A seed that disagrees with the others widens the interval: seeds are resampled too.
    shifted = rng.normal(1.0, 0.1, size=(5, 256))
    shifted[0] += 1.0
    wide = plot.bootstrap(shifted, np.random.default_rng(1))
    assert wide[1] - wide[0] > 0.3
    assert plot.bootstrap(np.full((5, 16), 2.0), np.random.default_rng(1)) == [2.0, 2.0]
