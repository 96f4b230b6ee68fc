"""kubealign.sweep: expansion, fan-out, names, validation, and maxParallel in the planner."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign import api, plan, render, sweep
from kubealign.plan import CreateAttempt
from tests.operator.run_builders import job, manifest, run, src, stage, uri


def pipeline(**dpo: Any) -> list[dict[str, Any]]:
    """sft -> generate (seeds) -> reward, dpo (betas) -> evaluate."""
    return [
        stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}),
        stage(
            "generate",
            "generate",
            inputs={"model": src("sft"), "data": uri("s3://d00/prompts")},
            hyperparameters={"scorer": "vader"},
            sweep={"seed": [0, 1]},
        ),
        stage("reward", "reward", inputs={"model": src("sft"), "data": src("generate")}),
        stage("dpo", "dpo", inputs={"model": src("sft"), "data": src("generate")}, **dpo),
        stage(
            "evaluate",
            "evaluate",
            inputs={
                "model": src("sft"),
                "rewardModel": src("reward"),
                "policies": [src("dpo"), {"uri": "s3://m00/other", "name": "other"}],
                "data": uri("s3://d00/eval"),
            },
            hyperparameters={"scorer": "vader"},
        ),
    ]


def names(alr: api.AlignmentRun) -> list[str]:
    return [s.name for s in alr.spec.stages]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0p1"),
        (3e-4, "0p0003"),
        (1e-05, "1e-05"),
        (-2, "m2"),
        (True, "true"),
        ("Cosine_LR", "cosine-lr"),
    ],
)
def test_slug(value: Any, text: str) -> None:
    assert sweep.slug(value) == text


def test_long_member_names_are_hashed_down_to_a_dns_label() -> None:
    name = sweep.member_name(
        "a-rather-long-stage-name", {"learning_rate": 0.000123456, "warmup_steps": 12345}
    )
    assert len(name) <= sweep.MAX_NAME
    assert api._DNS_LABEL.fullmatch(name)
    assert name != sweep.member_name(
        "a-rather-long-stage-name", {"learning_rate": 0.000123457, "warmup_steps": 12345}
    )


def test_a_sweep_expands_into_members_and_downstream_fans_out() -> None:
    alr = run(manifest(pipeline(sweep={"beta": [0.1, 0.3]})))
    assert names(alr) == [
        "sft",
        "generate-seed-0",
        "generate-seed-1",
        "reward-seed-0",
        "reward-seed-1",
        "dpo-beta-0p1-seed-0",
        "dpo-beta-0p3-seed-0",
        "dpo-beta-0p1-seed-1",
        "dpo-beta-0p3-seed-1",
        "evaluate-seed-0",
        "evaluate-seed-1",
    ]
    spec = alr.spec
    dpo = spec.stage("dpo-beta-0p3-seed-1")
    assert dpo.hyperparameters == {"beta": 0.3}
    assert dpo.seed == 1, "a member takes the seed it inherits"
    assert dpo.inputs.data == api.InputSource(from_stage="generate-seed-1")
    assert dpo.inputs.model == api.InputSource(from_stage="sft")
    assert dpo.sweep == sweep.Member("dpo", {"beta": 0.3, "seed": 1})
    assert spec.stage("sft").sweep is None
    evaluate = spec.stage("evaluate-seed-1")
    assert evaluate.inputs.reward_model == api.InputSource(from_stage="reward-seed-1")
    # Every dpo member of the same seed is a policy, named after the member; uri policies stay.
    assert [(p.from_stage, p.policy_name) for p in evaluate.inputs.policies] == [
        ("dpo-beta-0p1-seed-1", "dpo-beta-0p1-seed-1"),
        ("dpo-beta-0p3-seed-1", "dpo-beta-0p3-seed-1"),
        (None, "other"),
    ]
    assert [s.name for s in spec.members("dpo")] == names(alr)[5:9]


def test_members_render_their_own_config_and_artifact() -> None:
    alr = run(manifest(pipeline(sweep={"beta": [0.1, 0.3]})))
    member = alr.spec.stage("dpo-beta-0p1-seed-0")
    config = render.stage_config(alr, member)
    assert config.stage == "dpo-beta-0p1-seed-0"
    assert config.seed == 0
    assert config.hyperparameters["beta"] == 0.1
    assert config.inputs.data is not None and config.inputs.data.endswith("/generate-seed-0/artifact")
    assert config.output.endswith("/demo/dpo-beta-0p1-seed-0")
    assert render.job_name("demo", member.name, 1) == "demo-dpo-beta-0p1-seed-0-1"


def test_a_stage_reading_two_swept_stages_joins_them_on_shared_keys() -> None:
    stages = pipeline()
    stages[0]["sweep"] = {"seed": [0, 1]}
    del stages[1]["sweep"]
    stages[3]["sweep"] = {"beta": [0.1]}
    alr = run(manifest(stages))
    # generate fans out over sft; dpo reads sft-seed-k and generate-seed-k, never a mix.
    dpo = alr.spec.stage("dpo-beta-0p1-seed-1")
    assert dpo.inputs.model == api.InputSource(from_stage="sft-seed-1")
    assert dpo.inputs.data == api.InputSource(from_stage="generate-seed-1")
    assert len(alr.spec.members("dpo")) == 2


def test_evaluate_without_swept_single_inputs_receives_every_member() -> None:
    stages = pipeline(sweep={"beta": [0.1, 0.3], "seed": [4, 5]})
    del stages[1]["sweep"]
    stages[4]["inputs"]["policies"] = [{"from": "dpo", "name": "d"}]
    alr = run(manifest(stages))
    evaluate = alr.spec.stage("evaluate")
    assert [p.policy_name for p in evaluate.inputs.policies] == [
        "d-beta-0p1-seed-4",
        "d-beta-0p1-seed-5",
        "d-beta-0p3-seed-4",
        "d-beta-0p3-seed-5",
    ]
    assert alr.spec.stage("dpo-beta-0p3-seed-5").seed == 5


def test_status_names_each_member_and_its_values() -> None:
    alr = run(manifest(pipeline(sweep={"beta": [0.1, 0.3]})))
    status = plan.summarize(alr, [], None, [], "2026-01-01T00:00:00Z")
    entry = status.stage("dpo-beta-0p3-seed-0")
    assert entry is not None and entry.sweep == {"stage": "dpo", "values": {"beta": 0.3, "seed": 0}}
    assert entry.to_dict()["sweep"] == {"stage": "dpo", "values": {"beta": 0.3, "seed": 0}}
    assert api.StageStatus.from_dict(entry.to_dict()) == entry
    assert status.progress == "0/11"


def succeeded(*stages: str) -> list[plan.ObservedJob]:
    observed = [plan.observe_job(job("demo", s, state="succeeded")) for s in stages]
    return [o for o in observed if o is not None]


@pytest.mark.parametrize(
    ("running", "failed", "expected"),
    [
        pytest.param([], [], ["dpo-beta-0p1-seed-0", "dpo-beta-0p3-seed-0"], id="two slots, two start"),
        pytest.param(["dpo-beta-0p1-seed-0"], [], ["dpo-beta-0p3-seed-0"], id="one running, one more"),
        pytest.param(["dpo-beta-0p1-seed-0", "dpo-beta-0p3-seed-0"], [], [], id="full"),
        pytest.param(
            ["dpo-beta-0p1-seed-0"],
            ["dpo-beta-0p3-seed-0"],
            ["dpo-beta-0p3-seed-0"],
            id="a retry keeps its slot",
        ),
    ],
)
def test_max_parallel_bounds_running_members(
    running: list[str], failed: list[str], expected: list[str]
) -> None:
    alr = run(manifest(pipeline(sweep={"beta": [0.1, 0.3, 1.0]}, maxParallel=2)))
    jobs = succeeded("sft", "generate-seed-0", "generate-seed-1", "reward-seed-0", "reward-seed-1")
    jobs += [o for o in (plan.observe_job(job("demo", s)) for s in running) if o is not None]
    jobs += [o for o in (plan.observe_job(job("demo", s, state="failed")) for s in failed) if o is not None]
    started = [
        a.stage for a in plan.decide(alr, jobs) if isinstance(a, CreateAttempt) and a.stage.startswith("dpo")
    ]
    assert started == expected


def test_without_max_parallel_every_ready_member_starts() -> None:
    alr = run(manifest(pipeline(sweep={"beta": [0.1, 0.3, 1.0]})))
    jobs = succeeded("sft", "generate-seed-0", "generate-seed-1")
    started = [a.stage for a in plan.decide(alr, jobs) if isinstance(a, CreateAttempt)]
    assert len([s for s in started if s.startswith("dpo")]) == 6
    assert len([s for s in started if s.startswith("reward")]) == 2


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        pytest.param(
            {"sweep": {"betta": [0.1]}},
            "spec.stages[3].sweep.betta",
            "not a hyperparameter",
            id="unknown key",
        ),
        pytest.param(
            {"sweep": {"beta": [0.1, -1.0]}}, "spec.stages[3].sweep.beta[1]", "> 0", id="out of range"
        ),
        pytest.param(
            {"sweep": {"beta": [0.1, "x"]}}, "spec.stages[3].sweep.beta[1]", "a number", id="wrong type"
        ),
        pytest.param(
            {"sweep": {"seed": [1, -1]}}, "spec.stages[3].sweep.seed[1]", "integer >= 0", id="bad seed"
        ),
        pytest.param(
            {"sweep": {"beta": [0.1, 0.1]}}, "spec.stages[3].sweep.beta[1]", "same stage name", id="duplicate"
        ),
        pytest.param(
            {"sweep": {"beta": [0.1]}, "hyperparameters": {"beta": 0.2}},
            "spec.stages[3].sweep.beta",
            "also set in hyperparameters.beta",
            id="set twice",
        ),
        pytest.param(
            {"sweep": {"seed": [1]}}, "spec.stages[3].sweep.seed", "already sweeps seed", id="inherited key"
        ),
        pytest.param(
            {"sweep": {"learning_rate": [1e-5 * i for i in range(1, 10)], "warmup_steps": list(range(8))}},
            "spec.stages[3].sweep",
            "72 combinations",
            id="too many",
        ),
    ],
)
def test_bad_sweeps_are_refused_naming_the_field(change: dict[str, Any], path: str, words: str) -> None:
    stages = pipeline()
    stages[3].update(change)
    errors = api.validate(manifest(stages))
    assert any(e.path == path and words in e.message for e in errors), errors


def test_a_member_name_that_clashes_with_a_declared_stage_is_refused() -> None:
    stages = pipeline(sweep={"beta": [0.1]})
    stages.append(
        stage("dpo-beta-0p1-seed-0", "sft", inputs={"model": src("sft"), "data": uri("s3://d00/x")})
    )
    errors = api.validate(manifest(stages))
    assert any("clashes" in e.message for e in errors), errors


def test_a_valid_sweep_validates() -> None:
    assert api.validate(manifest(pipeline(sweep={"beta": [0.1, 0.3]}, maxParallel=1))) == []
