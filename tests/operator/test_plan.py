"""kubealign.plan: decisions, status and events from small Job builders. Table-driven."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kubealign import api, plan
from kubealign.plan import CreateAttempt, JobState, SetSuspended
from tests.operator.run_builders import UID, job, manifest, pod, run, src, stage, uri

NOW = "2026-01-01T01:00:00Z"


def observed(*jobs: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> list[plan.ObservedJob]:
    result = [plan.observe_job(j, pods) for j in jobs]
    assert all(r is not None for r in result)
    return [r for r in result if r is not None]


def done(*names: str) -> list[dict[str, Any]]:
    return [job("demo", n, state="succeeded") for n in names]


# --- observe_job -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "state"),
    [
        ({}, JobState.ACTIVE),
        ({"suspend": True}, JobState.SUSPENDED),
        ({"state": "succeeded"}, JobState.SUCCEEDED),
        ({"state": "failed"}, JobState.FAILED),
    ],
)
def test_observe_job_state(kwargs: dict[str, Any], state: JobState) -> None:
    seen = plan.observe_job(job("demo", "sft", 2, **kwargs))
    assert seen is not None
    assert (seen.name, seen.stage, seen.attempt, seen.state, seen.owner_uid) == (
        "demo-sft-2",
        "sft",
        2,
        state,
        UID,
    )


def test_observe_job_ignores_jobs_without_our_labels() -> None:
    foreign = job("demo", "sft")
    del foreign["metadata"]["labels"]["kubealign.io/attempt"]
    assert plan.observe_job(foreign) is None


def test_metrics_come_from_the_rank0_pod_termination_message() -> None:
    pods = [
        pod("demo-sft-1", phase="Succeeded", message='{"loss": 9}', index=1),
        pod("demo-sft-1", phase="Succeeded", message='{"loss": 0.25, "steps": 10}', index=0),
        pod("demo-other-1", phase="Succeeded", message='{"loss": 7}'),
    ]
    seen = plan.observe_job(job("demo", "sft", state="succeeded"), pods)
    assert seen is not None and seen.metrics == {"loss": 0.25, "steps": 10}
    assert plan.observe_job(job("demo", "sft", state="succeeded")).metrics is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("message", "metrics", "problem"),
    [
        ("", {}, ""),
        ("not json", {}, "termination message is not JSON"),
        ("[1, 2]", {}, "not a JSON object"),
    ],
)
def test_unreadable_metrics_are_reported_not_raised(
    message: str, metrics: dict[str, Any], problem: str
) -> None:
    seen = plan.observe_job(
        job("demo", "sft", state="succeeded"), [pod("demo-sft-1", phase="Succeeded", message=message)]
    )
    assert seen is not None and seen.metrics == metrics
    assert problem in (seen.message or "")


def test_failure_message_names_exit_code_and_termination_message() -> None:
    pods = [pod("demo-sft-1", phase="Failed", exit_code=3, message="CUDA out of memory")]
    seen = plan.observe_job(job("demo", "sft", state="failed"), pods)
    assert seen is not None
    assert seen.message == "exit code 3 (Error): CUDA out of memory"
    assert seen.reason.startswith("BackoffLimitExceeded")
    unread = plan.observe_job(job("demo", "sft", state="failed"))
    assert unread is not None and unread.message is None


# --- decide --------------------------------------------------------------------------------------------


def stages_of(actions: tuple[plan.Action, ...]) -> list[tuple[str, int]]:
    return [(a.stage, a.attempt) for a in actions if isinstance(a, CreateAttempt)]


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        pytest.param([], [("pretrain", 1)], id="nothing-yet: only the root starts"),
        pytest.param([job("demo", "pretrain")], [], id="root-running: nothing else"),
        pytest.param(done("pretrain"), [("sft", 1)], id="root-done: sft"),
        pytest.param(done("pretrain", "sft"), [("generate", 1)], id="sft-done: generate"),
        pytest.param(
            done("pretrain", "sft", "generate"), [("reward", 1), ("dpo", 1)], id="dpo and reward together"
        ),
        pytest.param(
            [*done("pretrain", "sft", "generate", "reward"), job("demo", "dpo")],
            [("ppo", 1)],
            id="ppo starts while dpo runs",
        ),
        pytest.param(
            [*done("pretrain", "sft", "generate", "reward", "dpo"), job("demo", "ppo")],
            [],
            id="evaluate waits for both policies",
        ),
        pytest.param(
            done("pretrain", "sft", "generate", "reward", "dpo", "ppo"), [("evaluate", 1)], id="evaluate last"
        ),
        pytest.param(
            done("pretrain", "sft", "generate", "reward", "dpo", "ppo", "evaluate"), [], id="all done"
        ),
    ],
)
def test_decide_walks_the_dag(jobs: list[dict[str, Any]], expected: list[tuple[str, int]]) -> None:
    assert stages_of(plan.decide(run(), observed(*jobs))) == expected


@pytest.mark.parametrize(
    ("attempts_failed", "max_retries", "expected"),
    [
        (1, 2, [("sft", 2)]),
        (2, 2, [("sft", 3)]),
        (3, 2, []),
        (1, 0, []),
    ],
)
def test_decide_retries_until_max_retries(
    attempts_failed: int, max_retries: int, expected: list[tuple[str, int]]
) -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")}, maxRetries=max_retries)]))
    jobs = [job("demo", "sft", n, state="failed") for n in range(1, attempts_failed + 1)]
    assert stages_of(plan.decide(alr, observed(*jobs))) == expected


def test_a_job_failed_by_its_pod_failure_policy_is_never_retried() -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")}, maxRetries=3)]))
    bad_input = job("demo", "sft", state="failed")
    bad_input["status"]["conditions"][0]["reason"] = "PodFailurePolicy"
    seen = observed(bad_input)
    assert seen[0].permanent
    assert plan.decide(alr, seen) == ()
    status = plan.summarize(alr, seen, None, (), "2026-01-01T00:20:00Z")
    assert (status.phase, status.stages[0].phase, status.stages[0].attempts) == ("Failed", "Failed", 1)


def test_a_failed_run_starts_nothing_new() -> None:
    body = manifest(
        [
            stage("a", "sft", inputs={"data": uri("s3://d00")}, maxRetries=0),
            stage("b", "sft", inputs={"data": uri("s3://e00")}),
        ]
    )
    jobs = observed(job("demo", "a", state="failed"))
    assert plan.decide(run(body), jobs) == ()


@pytest.mark.parametrize(
    ("suspend", "job_kwargs", "expected"),
    [
        (True, {}, (SetSuspended("demo-pretrain-1", True),)),
        (True, {"suspend": True}, ()),
        (False, {"suspend": True}, (SetSuspended("demo-pretrain-1", False),)),
        (False, {"suspend": True, "queue": "q"}, ()),  # Kueue unsuspends on admission, not us
        (True, {"state": "succeeded"}, ()),
    ],
)
def test_decide_follows_suspend(
    suspend: bool, job_kwargs: dict[str, Any], expected: tuple[plan.Action, ...]
) -> None:
    alr = run(manifest([stage("pretrain", "pretrain", inputs={"data": uri("s3://d00")})], suspend=suspend))
    assert plan.decide(alr, observed(job("demo", "pretrain", **job_kwargs))) == expected


def test_suspended_run_creates_nothing() -> None:
    assert plan.decide(run(manifest(suspend=True)), []) == ()


# --- summarize ---------------------------------------------------------------------------------------


def test_status_of_a_running_pipeline() -> None:
    jobs = observed(
        job(
            "demo",
            "pretrain",
            state="succeeded",
            created="2026-01-01T00:00:00Z",
            finished="2026-01-01T00:05:00Z",
        ),
        job("demo", "sft", 1, state="failed", created="2026-01-01T00:05:00Z"),
        job("demo", "sft", 2, created="2026-01-01T00:20:00Z"),
        pods=[
            pod("demo-pretrain-1", phase="Succeeded", message='{"loss": 1.5}'),
            pod("demo-sft-1", phase="Failed", exit_code=1, message="boom"),
        ],
    )
    status = plan.summarize(run(), jobs, None, [], NOW)
    assert (status.phase, status.progress, status.running_stages) == ("Running", "1/7", "sft")
    assert status.start_time == "2026-01-01T00:00:00Z"
    assert status.completion_time is None
    pretrain, sft, generate = status.stages[:3]
    assert (pretrain.phase, pretrain.metrics, pretrain.completion_time) == (
        "Succeeded",
        {"loss": 1.5},
        "2026-01-01T00:05:00Z",
    )
    assert pretrain.output == "s3://kubealign-test/runs/team-a/demo/pretrain/artifact"
    assert (sft.phase, sft.attempts, sft.job_name, sft.start_time) == (
        "Running",
        2,
        "demo-sft-2",
        "2026-01-01T00:05:00Z",
    )
    assert sft.message == "attempt 1 failed: exit code 1 (Error): boom"
    assert (generate.phase, generate.message) == ("Pending", "waiting for sft")
    conditions = {c.type: (c.status, c.reason) for c in status.conditions}
    assert conditions == {
        "Valid": ("True", "SpecValid"),
        "Progressing": ("True", "StagesRunning"),
        "Suspended": ("False", "NotSuspended"),
        "Ready": ("False", "StagesIncomplete"),
        "Failed": ("False", "NoFailure"),
        "MemoryFits": ("True", "NoKnownMisfit"),
    }
    assert all(c.observed_generation == 1 and c.last_transition_time == NOW for c in status.conditions)


def test_status_when_a_stage_exhausts_its_retries() -> None:
    body = manifest(
        [
            stage("sft", "sft", inputs={"data": uri("s3://d00")}, maxRetries=1),
            stage("dpo", "dpo", inputs={"model": src("sft"), "data": uri("s3://p00")}),
        ]
    )
    jobs = observed(
        job("demo", "sft", 1, state="failed"),
        job("demo", "sft", 2, state="failed", finished="2026-01-01T00:30:00Z"),
        pods=[pod("demo-sft-2", phase="Failed", exit_code=2, message="loss is NaN")],
    )
    status = plan.summarize(run(body), jobs, None, [], NOW)
    assert status.phase == "Failed"
    assert status.completion_time == "2026-01-01T00:30:00Z"
    sft = status.stages[0]
    assert (sft.phase, sft.attempts, sft.message) == ("Failed", 2, "exit code 2 (Error): loss is NaN")
    failed = status.condition("Failed")
    assert failed is not None and (failed.status, failed.reason) == ("True", "StageFailed")
    assert failed.message == "stage sft failed after 2 attempt(s): exit code 2 (Error): loss is NaN"


def test_recorded_metrics_and_failures_survive_when_pods_are_not_reread() -> None:
    """A restarted operator (or a later reconcile) does not re-read pods: the status keeps what it knew."""
    body = manifest(
        [
            stage("sft", "sft", inputs={"data": uri("s3://d00")}, maxRetries=0),
            stage("b", "sft", inputs={"data": uri("s3://e00")}, maxRetries=0),
        ]
    )
    first = plan.summarize(
        run(body),
        observed(
            job("demo", "sft", state="succeeded"),
            job("demo", "b", state="failed"),
            pods=[
                pod("demo-sft-1", phase="Succeeded", message='{"acc": 1}'),
                pod("demo-b-1", phase="Failed", exit_code=9, message="oom"),
            ],
        ),
        None,
        [],
        NOW,
    )
    again = plan.summarize(
        run(body),
        observed(job("demo", "sft", state="succeeded"), job("demo", "b", state="failed")),
        first,
        [],
        "2026-01-02T00:00:00Z",
    )
    assert again == first
    assert (
        plan.jobs_needing_pods(
            observed(job("demo", "sft", state="succeeded"), job("demo", "b", state="failed")), first
        )
        == ()
    )
    assert plan.jobs_needing_pods(observed(job("demo", "sft", state="succeeded")), None) == ("demo-sft-1",)


def test_succeeded_run() -> None:
    names = ["pretrain", "sft", "generate", "reward", "dpo", "ppo", "evaluate"]
    jobs = observed(
        *[job("demo", n, state="succeeded", finished=f"2026-01-01T00:0{i}:00Z") for i, n in enumerate(names)]
    )
    status = plan.summarize(run(), jobs, None, [], NOW)
    assert (status.phase, status.progress, status.running_stages) == ("Succeeded", "7/7", "")
    assert status.completion_time == "2026-01-01T00:06:00Z"
    ready = status.condition("Ready")
    assert ready is not None and ready.status == "True"


@pytest.mark.parametrize(
    ("suspend", "job_kwargs", "run_phase", "stage_phase"),
    [
        (True, {"suspend": True}, "Suspended", "Suspended"),
        (False, {"suspend": True, "queue": "q"}, "Running", "Queued"),
        (True, {}, "Suspended", "Running"),  # still running until the suspend patch lands
    ],
)
def test_suspended_and_queued(
    suspend: bool, job_kwargs: dict[str, Any], run_phase: str, stage_phase: str
) -> None:
    alr = run(manifest(suspend=suspend))
    status = plan.summarize(alr, observed(job("demo", "pretrain", **job_kwargs)), None, [], NOW)
    assert (status.phase, status.stages[0].phase) == (run_phase, stage_phase)


def test_invalid_spec_fails_the_run_with_the_reason() -> None:
    errors = [api.FieldError("spec.stages[2].inputs.rewardModel.from", "needs a reward model")]
    status = plan.summarize(run(), [], None, errors, NOW)
    assert status.phase == "Failed"
    valid = status.condition("Valid")
    assert valid is not None and (valid.status, valid.reason) == ("False", "InvalidSpec")
    assert "spec.stages[2].inputs.rewardModel.from" in valid.message
    assert status.completion_time == NOW


def test_condition_transition_time_changes_only_with_status() -> None:
    first = plan.summarize(run(), observed(job("demo", "pretrain")), None, [], NOW)
    later = "2026-01-01T02:00:00Z"
    second = plan.summarize(
        run(), observed(job("demo", "pretrain", state="succeeded"), job("demo", "sft")), first, [], later
    )
    times = {c.type: c.last_transition_time for c in second.conditions}
    assert times["Valid"] == NOW and times["Progressing"] == NOW
    third = plan.summarize(
        run(manifest(suspend=True)), observed(job("demo", "pretrain", suspend=True)), second, [], later
    )
    assert {c.type: c.last_transition_time for c in third.conditions}["Suspended"] == later


# --- transitions ------------------------------------------------------------------------------------


def reasons(notes: tuple[plan.Note, ...]) -> list[str]:
    return [n.reason for n in notes]


def test_events_for_each_transition_and_none_when_nothing_changed() -> None:
    alr = run()
    s0 = plan.summarize(alr, [], None, [], NOW)
    s1 = plan.summarize(alr, observed(job("demo", "pretrain")), s0, [], NOW)
    assert reasons(plan.transitions(s0, s1)) == ["StageStarted", "RunStarted"]
    assert plan.transitions(s1, s1) == ()
    s2 = plan.summarize(
        alr, observed(job("demo", "pretrain", state="succeeded"), job("demo", "sft")), s1, [], NOW
    )
    assert reasons(plan.transitions(s1, s2)) == ["StageSucceeded", "StageStarted"]
    s3 = plan.summarize(
        alr,
        observed(
            job("demo", "pretrain", state="succeeded"),
            job("demo", "sft", state="failed"),
            pods=[pod("demo-sft-1", phase="Failed", exit_code=1)],
        ),
        s2,
        [],
        NOW,
    )
    assert reasons(plan.transitions(s2, s3)) == ["StageAttemptFailed"]
    s4 = plan.summarize(
        alr,
        observed(
            job("demo", "pretrain", state="succeeded"),
            job("demo", "sft", state="failed"),
            job("demo", "sft", 2),
        ),
        s3,
        [],
        NOW,
    )
    (note,) = plan.transitions(s3, s4)
    assert (note.type, note.reason) == ("Warning", "StageRetrying")
    assert "attempt 2" in note.message and "attempt 1 failed: exit code 1" in note.message


def test_events_for_run_failure_and_invalid_spec() -> None:
    body = manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")}, maxRetries=0)])
    before = plan.summarize(run(body), observed(job("demo", "sft")), None, [], NOW)
    after = plan.summarize(run(body), observed(job("demo", "sft", state="failed"), pods=[]), before, [], NOW)
    assert reasons(plan.transitions(before, after)) == ["StageFailed", "RunFailed"]
    invalid = plan.summarize(run(body), [], None, [api.FieldError("spec.x", "bad")], NOW)
    assert reasons(plan.transitions(None, invalid)) == ["InvalidSpec", "RunFailed"]
    assert plan.transitions(invalid, invalid) == ()


def test_events_for_suspend_and_resume() -> None:
    running = plan.summarize(run(), observed(job("demo", "pretrain")), None, [], NOW)
    suspended = plan.summarize(
        run(manifest(suspend=True)), observed(job("demo", "pretrain", suspend=True)), running, [], NOW
    )
    assert reasons(plan.transitions(running, suspended)) == ["StageSuspended", "RunSuspended"]
    resumed = plan.summarize(run(), observed(job("demo", "pretrain")), suspended, [], NOW)
    assert reasons(plan.transitions(suspended, resumed)) == ["StageResumed", "RunResumed"]


@pytest.mark.parametrize(
    ("notes", "events"),
    [
        ([], []),
        ([("Normal", "StageStarted", "a")], [("Normal", "StageStarted", "a")]),
        # A hand-over: one Event, the first note's reason, both messages.
        (
            [("Normal", "StageSucceeded", "s0 done"), ("Normal", "StageStarted", "s1 started")],
            [("Normal", "StageSucceeded", "s0 done; s1 started")],
        ),
        # Warnings stay one Event each, before the merged Normal one.
        (
            [
                ("Normal", "StageSucceeded", "s0 done"),
                ("Warning", "StageAttemptFailed", "s1 failed"),
                ("Warning", "StageWillNotFit", "s2 too big"),
                ("Normal", "StageStarted", "s3 started"),
            ],
            [
                ("Warning", "StageAttemptFailed", "s1 failed"),
                ("Warning", "StageWillNotFit", "s2 too big"),
                ("Normal", "StageSucceeded", "s0 done; s3 started"),
            ],
        ),
    ],
)
def test_coalesce_posts_one_normal_event_per_reconcile(
    notes: list[tuple[str, str, str]], events: list[tuple[str, str, str]]
) -> None:
    merged = plan.coalesce([plan.Note(*note) for note in notes])
    assert [(note.type, note.reason, note.message) for note in merged] == events


def workload(*conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "message": message}
                for kind, status, reason, message in conditions
            ]
        }
    }


QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
    "default-flavor, 8 more needed"
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, ""),
        (workload(), ""),
        (workload(("QuotaReserved", "False", "Pending", QUOTA)), f"waiting for Kueue: {QUOTA}"),
        (
            workload(
                ("QuotaReserved", "True", "QuotaReserved", "ok"), ("Admitted", "True", "Admitted", "ok")
            ),
            "",
        ),
        (
            workload(
                ("Admitted", "True", "Admitted", "ok"),
                ("Evicted", "True", "Preempted", "Preempted to accommodate a workload with higher priority"),
            ),
            "evicted by Kueue (Preempted): Preempted to accommodate a workload with higher priority",
        ),
        (
            workload(("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout")),
            "evicted by Kueue (PodsReadyTimeout): Exceeded the PodsReady timeout",
        ),
        (workload(("Evicted", "False", "Preempted", "old news"), ("Admitted", "True", "Admitted", "ok")), ""),
    ],
)
def test_admission_message_says_what_kueue_said(body: dict[str, Any] | None, expected: str) -> None:
    assert plan.admission_message(body) == expected


def test_queue_time_is_carried_while_queued_and_added_up_over_every_wait() -> None:
    alr = run(manifest([stage("sft", "sft", inputs={"data": uri("s3://d00")})], queueName="gpus"))
    waiting = observed(job("demo", "sft", suspend=True, queue="gpus"))
    going = observed(job("demo", "sft", queue="gpus"))

    def status(jobs: list[Any], previous: api.RunStatus | None, now: str) -> api.RunStatus:
        return plan.summarize(alr, jobs, previous, (), now)

    first = status(waiting, None, "2026-01-01T00:00:00Z")
    assert (first.stages[0].phase, first.stages[0].queued_since) == ("Queued", "2026-01-01T00:00:00Z")
    still = status(waiting, first, "2026-01-01T00:00:09Z")
    assert still.stages[0].queued_since == "2026-01-01T00:00:00Z"  # unchanged: no status write
    admitted = status(going, still, "2026-01-01T00:00:12Z")
    assert (admitted.stages[0].queued_since, admitted.stages[0].queued_seconds) == (None, 12.0)
    preempted = status(waiting, admitted, "2026-01-01T00:05:00Z")
    assert (preempted.stages[0].queued_since, preempted.stages[0].queued_seconds) == (
        "2026-01-01T00:05:00Z",
        12.0,
    )
    again = status(going, preempted, "2026-01-01T00:05:05Z")
    assert again.stages[0].queued_seconds == 17.0
    assert status(going, again, "2026-01-01T00:09:00Z").stages[0].queued_seconds == 17.0
    assert api.RunStatus.from_dict(again.to_dict()) == again


def test_a_queued_stage_is_marked_and_kueues_reason_is_the_progress_message() -> None:
    stages = [
        stage("a", "sft", inputs={"data": uri("s3://d00")}),
        stage("b", "sft", inputs={"data": uri("s3://e00")}),
    ]
    alr = run(manifest(stages, queueName="gpus"))
    jobs = observed(job("demo", "a", queue="gpus"), job("demo", "b", suspend=True, queue="gpus"))
    jobs[1] = replace(jobs[1], admission="waiting for Kueue: insufficient unused quota for nvidia.com/gpu")
    status = plan.summarize(alr, jobs, None, (), "2026-01-01T00:00:00Z")
    assert status.running_stages == "a,b(queued)"
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert (
        progressing.message
        == "running: a; b queued: waiting for Kueue: insufficient unused quota for nvidia.com/gpu"
    )
