"""GRPO: group advantages and the RLOO baseline on hand-worked groups, the loss, the verifiers on
tricky answers, and the stage: training, no reference at kl_coef 0, resume, two processes as one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubealign_jobs import rl, storage, verifiers
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, write_jsonl
from tests.jobs.trainer_toys import run_stage, run_until_checkpoint, stage_config

# ---------------------------------------------------------------------------- the math


def test_grpo_advantages_on_hand_worked_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    plain = rl.group_advantages(rewards, 3, scale=False)
    assert plain.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])
    scaled = rl.group_advantages(rewards, 3)
    # Standard deviations (n - 1): sqrt(1/3) for the first group, 2 for the second.
    assert scaled.tolist() == pytest.approx(
        [
            (2 / 3) / (3**-0.5 + 1e-4),
            (-1 / 3) / (3**-0.5 + 1e-4),
            (-1 / 3) / (3**-0.5 + 1e-4),
            -1.0,
            0.0,
            1.0,
        ],
        rel=1e-4,
    )


def test_rloo_subtracts_the_mean_of_the_others() -> None:
    rewards = torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 4.0])
    loo = rl.group_advantages(rewards, 3, method="rloo", scale=False)
    assert loo.tolist() == pytest.approx([3.0, -1.5, -1.5, -1.5, -1.5, 3.0])
    # G / (G - 1) times the group-mean advantage.
    assert loo.tolist() == pytest.approx((rl.group_advantages(rewards, 3, scale=False) * 1.5).tolist())


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_group_of_equal_rewards_has_zero_advantage_and_no_nan(method: str) -> None:
    advantages = rl.group_advantages(torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0]), 3, method=method)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert not advantages.isnan().any()


def test_groups_must_divide_the_rewards() -> None:
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="advantage"):
        rl.group_advantages(torch.zeros(4), 2, method="ppo")


def test_grpo_loss_at_ratio_one_and_its_gradient() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = rl.grpo_loss(logprobs, logprobs.detach(), advantages, mask, clip_range=0.2)
    # At ratio 1 the surrogate is -A per token: the mean over completions of -A is 0 here.
    assert loss.item() == pytest.approx(0.0)
    assert stats["clip_fraction"].item() == 0.0
    loss.backward()  # type: ignore[no-untyped-call]
    assert logprobs.grad is not None
    # A positive advantage raises its tokens' log-probs; padding gets no gradient.
    assert (logprobs.grad[0] < 0).all() and (logprobs.grad[1, :2] > 0).all() and logprobs.grad[1, 2] == 0


def test_the_kl_term_is_k3_and_zero_at_the_reference() -> None:
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    zero_advantage = torch.zeros(1)
    same, stats = rl.grpo_loss(
        logprobs, logprobs, zero_advantage, mask, clip_range=0.2, ref_logprobs=logprobs, kl_coef=0.5
    )
    assert same.item() == pytest.approx(0.0) and stats["kl"].item() == pytest.approx(0.0)
    ref = torch.tensor([[-1.5, -1.0]])
    apart, stats = rl.grpo_loss(
        logprobs, logprobs, zero_advantage, mask, clip_range=0.2, ref_logprobs=ref, kl_coef=0.5
    )
    k3 = [torch.exp(r - p) - (r - p) - 1 for p, r in zip(logprobs[0], ref[0], strict=True)]
    assert apart.item() == pytest.approx(0.5 * float(sum(k3)) / 2)
    assert stats["kl"].item() == pytest.approx(float(sum(k3)) / 2)


# ---------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("  paris.  \nThe capital of France.", "Paris", 1.0),
        ("Paris  ", " paris", 1.0),
        ("Paris is the capital", "Paris", 0.0),
        ("", "Paris", 0.0),
        ("New   York", "new york", 1.0),
    ],
)
def test_exact_match(completion: str, answer: str, expected: float) -> None:
    assert verifiers.exact_match(completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (" 19", "19", 1.0),
        ("19.0, I think", "19", 1.0),
        ("1,234 apples", "1234", 1.0),
        ("\u22125", "-5", 1.0),
        ("3/4", "0.75", 1.0),
        ("so \\boxed{42} and then 7", "42", 1.0),
        ("12+7=19", "19", 1.0),
        ("#### 18", "18", 1.0),
        ("50%", "50", 1.0),
        ("1e3", "1000", 1.0),
        ("18", "19", 0.0),
        ("nineteen", "19", 0.0),
        ("19", "not a number", 0.0),
    ],
)
def test_math(completion: str, answer: str, expected: float) -> None:
    assert verifiers.math_match(completion, answer) == expected


def test_regex_with_the_answer_and_weights_combined() -> None:
    assert verifiers.regex_match("the answer is 7.", "7", r"answer is {answer}\b") == 1.0
    assert verifiers.regex_match("the answer is 77.", "7", r"answer is {answer}\b") == 0.0
    assert verifiers.regex_match("a+b", "a+b", r"^{answer}$") == 1.0  # the answer is escaped
    score = verifiers.combined({"exact_match": 1.0, "math": 0.5})
    assert score(["19", "19.0 yes", "x"], ["19", "19", "19"]) == [1.5, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"hyperparameters\.regex"):
        verifiers.verifier("regex")
    with pytest.raises(ValueError, match="not a regular expression"):
        verifiers.verifier("regex", pattern="(")


# ---------------------------------------------------------------------------- the stage

FAST = {
    "steps": 6,
    "prompts_per_step": 4,
    "group_size": 4,
    "max_new_tokens": 6,
    "learning_rate": 3e-3,
    "checkpoint_every": 0,
    "verifiers": {"regex": 1.0},
    "regex": r"\bgood\b",
}


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("grpo-inputs")
    policy = save_toy_policy(root / "policy", seed=0)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    return {"model": str(policy), "data": str(prompts)}


def config(tmp_path: Path, inputs: dict[str, str], **hyperparameters: Any) -> Path:
    return stage_config(
        tmp_path,
        stage_type="grpo",
        output=str(tmp_path / "out"),
        inputs=inputs,
        hyperparameters={**FAST, **hyperparameters},
    )


def test_grpo_raises_a_verifiable_reward_and_loads_no_reference_at_kl_zero(
    toy_inputs: dict[str, str], tmp_path: Path
) -> None:
    # The reference does not exist: with kl_coef 0 it is never read.
    inputs = {**toy_inputs, "reference": str(tmp_path / "missing")}
    run = run_stage("grpo", config(tmp_path, inputs, steps=12), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = run.steps
    assert [r["step"] for r in steps] == list(range(1, 13))
    first, last = sum(r["reward"] for r in steps[:3]) / 3, sum(r["reward"] for r in steps[-3:]) / 3
    assert last > first + 0.1, [r["reward"] for r in steps]
    assert all(0.0 <= r["zero_std_fraction"] <= 1.0 for r in steps)
    assert "kl" not in steps[0]
    assert storage.is_complete(str(tmp_path / "out" / "artifact"))


def test_grpo_with_a_kl_term_reports_it(toy_inputs: dict[str, str], tmp_path: Path) -> None:
    run = run_stage(
        "grpo", config(tmp_path, toy_inputs, steps=3, kl_coef=0.1, epochs=2, mini_batch_size=8), tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.steps[0]["kl"] >= 0.0 and run.steps[-1]["kl"] > 0.0


def test_grpo_resumes_from_its_checkpoint_exactly(toy_inputs: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    inputs = {**toy_inputs, "eval_data": toy_inputs["data"]}
    straight = run_stage("grpo", config(tmp_path / "a", inputs, checkpoint_every=3), tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The starting policy's held-out reward is measured before the first step.
    assert straight.events("held_out")[0]["step"] == 0
    assert straight.termination is not None and straight.termination["eval_prompts"] == len(PROMPTS) * 4
    # A lost artifact: the retry resumes from the step-3 checkpoint and replays steps 4-6 exactly.
    storage.delete_prefix(str(tmp_path / "a" / "out" / "artifact"))
    again = run_stage("grpo", config(tmp_path / "a", inputs, checkpoint_every=3), tmp_path / "a")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in again.steps] == [4, 5, 6]
    # The checkpoint kept the initial held-out reward; the final one is the same policy's.
    assert not again.events("held_out")
    assert again.termination is not None
    for name in ("eval_reward_initial", "eval_reward"):
        assert again.termination[name] == pytest.approx(straight.termination[name])
    for before, after in zip(straight.steps[3:], again.steps, strict=True):
        assert after["reward"] == pytest.approx(before["reward"])
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)


def test_a_killed_grpo_run_resumes_where_its_checkpoint_left_off(
    toy_inputs: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = run_stage("grpo", config(tmp_path / "straight", toy_inputs, checkpoint_every=2), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed_config = config(tmp_path / "killed", toy_inputs, checkpoint_every=2, keep_checkpoints=5)
    run_until_checkpoint("grpo", tmp_path / "killed", killed_config, 2)
    # Whatever the run wrote after checkpoint 2 before SIGKILL landed goes: a kill right after it.
    checkpoints = tmp_path / "killed" / "out" / "checkpoints"
    storage.delete_prefix(str(checkpoints / "step-00000004"))
    storage.delete_prefix(str(tmp_path / "killed" / "out" / "artifact"))
    resumed = run_stage("grpo", killed_config, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] == 2
    assert [r["step"] for r in resumed.steps] == [3, 4, 5, 6]
    # Optimizer, schedule, data position and the sampling streams continue: the same steps.
    for before, after in zip(straight.steps[2:], resumed.steps, strict=True):
        assert after["reward"] == pytest.approx(before["reward"], abs=1e-9)
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)


def test_two_grpo_processes_train_as_one_with_their_prompts_together(
    toy_inputs: dict[str, str], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    # prompts_per_step is per process: 2 x 1 and 1 x 2 are the same global rollout of 2 groups.
    runs, weights = {}, {}
    for processes, per_process in ((1, 2), (2, 1)):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        inputs = {**toy_inputs, "eval_data": toy_inputs["data"]}
        path = stage_config(
            folder,
            stage_type="grpo",
            output=str(folder / "out"),
            inputs=inputs,
            hyperparameters={**FAST, "steps": 3, "prompts_per_step": per_process},
            distributed={"nproc_per_node": processes},
        )
        run = run_stage("grpo", path, folder)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[processes] = run
        artifact = folder / "out" / "artifact"
        assert storage.is_complete(str(artifact))
        weights[processes] = load_file(str(artifact / "model.safetensors"))

    assert "launching 1 x 2 processes" in runs[2].stderr
    one, two = runs[1].steps, runs[2].steps
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    # The same completions (rewards equal) and the same update (losses and weights within float noise).
    for a, b in zip(one, two, strict=True):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-9), a["step"]
        assert b["completion_length"] == pytest.approx(a["completion_length"], abs=1e-9), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]
    assert len({r["reward"] for r in one}) > 1  # the policy moved: the steps are not all alike
    assert weights[1].keys() == weights[2].keys()
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("eval_reward_initial", "eval_reward"):
        assert runs[2].termination[name] == pytest.approx(runs[1].termination[name])  # type: ignore[index]


@pytest.mark.parametrize(
    ("hyperparameters", "rows", "words"),
    [
        ({"verifiers": {}, "regex": None}, None, "hyperparameters.verifiers: a grpo stage needs"),
        ({"verifiers": {"exact_match": 1.0}, "regex": None}, None, "field 'answer': missing"),
        (
            {"verifiers": {"exact": 1.0}, "regex": None},
            None,
            "hyperparameters.verifiers.exact: unknown verifier",
        ),
        ({"mini_batch_size": 5}, None, "hyperparameters.mini_batch_size"),
    ],
)
def test_bad_configs_and_rows_fail_naming_the_field(
    toy_inputs: dict[str, str], tmp_path: Path, hyperparameters: dict[str, Any], rows: Any, words: str
) -> None:
    run = run_stage("grpo", config(tmp_path, toy_inputs, **hyperparameters), tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert words in run.stderr, run.stderr[-2000:]
    assert json.loads((tmp_path / "termination-log").read_text())["status"] == "failed"


def test_help_documents_the_stage() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "kubealign_jobs.grpo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "group-relative policy optimisation" in result.stdout
    for name in ("group_size", "advantage", "scale_rewards", "kl_coef", "verifiers"):
        assert f"\n    {name} " in result.stdout
