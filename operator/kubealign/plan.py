"""The stage DAG, purely: what to do next and what the status says, given the spec and the Jobs.

A reconcile is read -> ``decide`` -> act -> ``summarize`` -> one status patch:

- ``observe_job`` turns a Job (and, once it finished, its pods) into an ``ObservedJob``.
- ``decide`` lists the actions: create the first attempt of every stage whose inputs have all
  succeeded, create attempt N+1 of a stage whose attempt N failed while retries remain, suspend or
  unsuspend Jobs to follow ``spec.suspend``.
- ``summarize`` computes the whole status from the Jobs alone (plus metrics already recorded), so a
  restarted operator recovers it; ``transitions`` lists the Kubernetes Events the change deserves.

Attempts are numbered from 1; attempt N's Job is ``render.job_name(run, stage, N)``.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from kubealign.api import (
    AlignmentRun,
    Condition,
    FieldError,
    RunPhase,
    RunStatus,
    Stage,
    StagePhase,
    StageStatus,
    parse_time,
)
from kubealign.render import (
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER_NAME,
    JOB_NAME_LABEL,
    LABEL_ATTEMPT,
    LABEL_QUEUE,
    LABEL_STAGE,
    compact_json,
    stage_output,
)
from kubealign_jobs.config import artifact_uri

MESSAGE_LIMIT: Final = 1024


class JobState(enum.StrEnum):
    ACTIVE = "Active"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class ObservedJob:
    """What the planner needs to know about one stage attempt's Job."""

    name: str
    stage: str
    attempt: int
    state: JobState
    created: str | None = None
    finished: str | None = None
    # From the pods of a finished Job; None when they were not read (the status already has it).
    message: str | None = None
    metrics: Mapping[str, Any] | None = None
    # The Job's own Failed condition, the fallback when the pods say nothing.
    reason: str = ""
    queued: bool = False
    owner_uid: str | None = None
    # Why Kueue has not admitted a queued Job (yet, or again), from its Workload; "" when it says nothing.
    admission: str = ""
    # Failed by its podFailurePolicy (the trainer's configuration-or-data exit code): never retried.
    permanent: bool = False


def admission_message(workload: Mapping[str, Any] | None) -> str:
    """Kueue's own word on a Workload that is not running: evicted (preempted, pods not ready in
    time) or waiting for quota ("couldn't assign flavors to pod set main: insufficient unused quota
    for nvidia.com/gpu ..."). "" when it is admitted or says nothing yet."""
    conditions = {
        str(item.get("type")): item for item in ((workload or {}).get("status") or {}).get("conditions") or ()
    }

    def said(kind: str, status: str) -> Mapping[str, Any] | None:
        condition = conditions.get(kind)
        return condition if condition is not None and condition.get("status") == status else None

    if (evicted := said("Evicted", "True")) is not None:
        detail = str(evicted.get("message") or "").strip()
        return _truncate(f"evicted by Kueue ({evicted.get('reason') or 'Evicted'}): {detail}".rstrip(": "))
    if said("Admitted", "True") is not None:
        return ""
    for kind in ("QuotaReserved", "Admitted"):
        if (waiting := said(kind, "False")) is not None and waiting.get("message"):
            return _truncate(f"waiting for Kueue: {str(waiting['message']).strip()}")
    return ""


def _condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in job.get("status", {}).get("conditions") or ():
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses") or ():
        if status.get("name") == CONTAINER_NAME:
            state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
            return dict(state) if state else None
    return None


def _pod_rank(pod: Mapping[str, Any]) -> int:
    index = pod.get("metadata", {}).get("annotations", {}).get(COMPLETION_INDEX_ANNOTATION, "0")
    return int(index) if str(index).isdigit() else 0


def _truncate(text: str) -> str:
    text = text.strip()
    # Keep the end: a traceback's last lines say what went wrong.
    return text if len(text) <= MESSAGE_LIMIT else "..." + text[-(MESSAGE_LIMIT - 3) :]


def read_metrics(pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """Final metrics from the rank-0 pod that succeeded: (metrics, problem). Rank 0 writes them."""
    succeeded = sorted((p for p in pods if p.get("status", {}).get("phase") == "Succeeded"), key=_pod_rank)
    for pod in succeeded:
        terminated = _terminated(pod)
        if terminated is None:
            continue
        text = (terminated.get("message") or "").strip()
        if not text:
            return {}, ""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return {}, f"termination message is not JSON: {_truncate(text)[:200]}"
        if not isinstance(value, dict):
            return {}, "termination message is not a JSON object"
        return value, ""
    return None, ""


def read_failure(pods: Sequence[Mapping[str, Any]]) -> str:
    """Why a pod of the Job failed: exit code, reason and the termination message (or log tail)."""
    for pod in sorted(pods, key=_pod_rank):
        if pod.get("status", {}).get("phase") != "Failed":
            continue
        terminated = _terminated(pod)
        if terminated is None:
            reason = pod.get("status", {}).get("reason") or "Failed"
            return _truncate(f"pod {pod['metadata']['name']}: {reason}: {pod['status'].get('message', '')}")
        return failure_text(
            f"exit code {terminated.get('exitCode')} ({terminated.get('reason') or 'Error'})",
            terminated.get("message") or "",
        )
    return ""


def failure_text(head: str, detail: str) -> str:
    """``<head>: <detail>`` as a stage's status message, in the operator and the local runner alike.

    ``detail`` is the trainer's termination message (its ``error`` when that is JSON with one) or
    a log tail; long texts keep their end, where a traceback says what went wrong.
    """
    text = detail.strip()
    with contextlib.suppress(ValueError):
        doc = json.loads(text)
        if isinstance(doc, dict) and doc.get("error"):
            text = str(doc["error"])
    return _truncate(f"{head}: {text}" if text else head)


def observe_job(
    job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]] | None = None
) -> ObservedJob | None:
    """Classify a Job. ``pods`` (any pods; those of this Job are picked by label) give the metrics of
    a succeeded Job and the failure of a failed one; None means they were not read.

    Returns None for a Job without the operator's stage/attempt labels.
    """
    meta = job.get("metadata", {})
    labels = meta.get("labels") or {}
    attempt = str(labels.get(LABEL_ATTEMPT, ""))
    if LABEL_STAGE not in labels or not attempt.isdigit():
        return None
    mine = (
        None
        if pods is None
        else [
            p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(JOB_NAME_LABEL) == meta["name"]
        ]
    )
    status = job.get("status") or {}
    complete = _condition(job, "Complete")
    failed = _condition(job, "Failed")
    metrics: Mapping[str, Any] | None = None
    message: str | None = None
    reason = ""
    finished: str | None = None
    if complete is not None:
        state = JobState.SUCCEEDED
        finished = status.get("completionTime") or complete.get("lastTransitionTime")
        if mine is not None:
            metrics, message = read_metrics(mine)
    elif failed is not None:
        state = JobState.FAILED
        finished = failed.get("lastTransitionTime")
        reason = _truncate(f"{failed.get('reason') or 'Failed'}: {failed.get('message') or ''}".rstrip(": "))
        if mine is not None:
            message = read_failure(mine) or reason
    elif job.get("spec", {}).get("suspend"):
        state = JobState.SUSPENDED
    else:
        state = JobState.ACTIVE
    owners = [o.get("uid") for o in meta.get("ownerReferences") or () if o.get("controller")]
    return ObservedJob(
        name=meta["name"],
        stage=labels[LABEL_STAGE],
        attempt=int(attempt),
        state=state,
        created=meta.get("creationTimestamp"),
        finished=finished,
        message=message,
        metrics=metrics,
        reason=reason,
        queued=LABEL_QUEUE in labels,
        owner_uid=owners[0] if owners else None,
        permanent=failed is not None and failed.get("reason") == "PodFailurePolicy",
    )


def latest_attempts(jobs: Sequence[ObservedJob]) -> dict[str, ObservedJob]:
    """The newest attempt of each stage."""
    return {name: attempts[-1] for name, attempts in _by_stage(jobs).items()}


def jobs_needing_pods(jobs: Sequence[ObservedJob], previous: RunStatus | None) -> tuple[str, ...]:
    """Finished latest attempts whose outcome the status does not hold yet: their pods must be read."""
    names: list[str] = []
    for job in latest_attempts(jobs).values():
        if job.state not in (JobState.SUCCEEDED, JobState.FAILED):
            continue
        recorded = previous.stage(job.stage) if previous else None
        done = (
            (StagePhase.SUCCEEDED,)
            if job.state is JobState.SUCCEEDED
            else (StagePhase.FAILED, StagePhase.RETRYING)
        )
        if recorded is None or recorded.job_name != job.name or recorded.phase not in done:
            names.append(job.name)
    return tuple(names)


# --- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateAttempt:
    """Create the Job (and its ConfigMap / Service) of one attempt of a stage."""

    stage: str
    attempt: int


@dataclass(frozen=True)
class SetSuspended:
    """Set ``spec.suspend`` of a Job."""

    job: str
    suspend: bool


Action = CreateAttempt | SetSuspended


def _by_stage(jobs: Sequence[ObservedJob]) -> dict[str, list[ObservedJob]]:
    grouped: dict[str, list[ObservedJob]] = {}
    for job in sorted(jobs, key=lambda j: (j.stage, j.attempt)):
        grouped.setdefault(job.stage, []).append(job)
    return grouped


def exhausted(stage: Stage, latest: ObservedJob | None) -> bool:
    """The stage's last attempt failed and no retry is left (or none would help)."""
    return (
        latest is not None
        and latest.state is JobState.FAILED
        and (latest.permanent or latest.attempt > stage.max_retries)
    )


def decide(run: AlignmentRun, jobs: Sequence[ObservedJob]) -> tuple[Action, ...]:
    """The actions that move the run towards its spec. Idempotent: Jobs that exist are not re-made.

    A run that has failed (some stage exhausted its retries) starts nothing new; its running Jobs
    finish on their own, since their artifacts may still be useful. Members of a sweep with
    ``maxParallel`` start only while fewer than that many of them are running or retrying.
    """
    latest = latest_attempts(jobs)
    failed = any(exhausted(stage, latest.get(stage.name)) for stage in run.spec.stages)
    suspend = run.spec.suspend
    actions: list[Action] = []
    # Per sweep: the members that hold a slot (a live Job, or a failed one about to be retried).
    busy: dict[str, int] = {}
    for stage in run.spec.stages:
        last = latest.get(stage.name)
        holds = last is not None and last.state is not JobState.SUCCEEDED and not exhausted(stage, last)
        if stage.sweep is not None and holds:
            busy[stage.sweep.of] = busy.get(stage.sweep.of, 0) + 1
    for stage in run.spec.stages:
        last = latest.get(stage.name)
        if last is not None and last.state is JobState.ACTIVE and suspend:
            actions.append(SetSuspended(last.name, True))
        elif last is not None and last.state is JobState.SUSPENDED and not suspend and not last.queued:
            # A Job under a Kueue queue is unsuspended by Kueue when it is admitted, never by us.
            actions.append(SetSuspended(last.name, False))
        if suspend or failed:
            continue
        if last is None:
            upstream = stage.inputs.upstream()
            if not all(latest.get(u) is not None and latest[u].state is JobState.SUCCEEDED for u in upstream):
                continue
            if stage.sweep is not None and stage.sweep.max_parallel is not None:
                if busy.get(stage.sweep.of, 0) >= stage.sweep.max_parallel:
                    continue
                busy[stage.sweep.of] = busy.get(stage.sweep.of, 0) + 1
            actions.append(CreateAttempt(stage.name, 1))
        elif last.state is JobState.FAILED and not exhausted(stage, last):
            actions.append(CreateAttempt(stage.name, last.attempt + 1))
    return tuple(actions)


# --- status ---------------------------------------------------------------------------------------


def _stage_status(
    run: AlignmentRun,
    stage: Stage,
    attempts: Sequence[ObservedJob],
    previous: StageStatus | None,
    phases: Mapping[str, str],
) -> StageStatus:
    output = artifact_uri(stage_output(run, stage))
    member = stage.sweep.to_dict() if stage.sweep is not None else None
    base = StageStatus(name=stage.name, type=stage.type, output=output, sweep=member)
    if not attempts:
        waiting = [u for u in stage.inputs.upstream() if phases.get(u) != StagePhase.SUCCEEDED]
        message = (
            "run is suspended"
            if run.spec.suspend
            else (f"waiting for {', '.join(waiting)}" if waiting else "")
        )
        return replace(base, message=message)
    last = attempts[-1]
    # The status already recorded for this very Job fills in what was not re-read from its pods.
    recorded = previous if previous is not None and previous.job_name == last.name else None
    status = replace(base, job_name=last.name, attempts=last.attempt, start_time=attempts[0].created)
    if last.state is JobState.SUCCEEDED:
        metrics = last.metrics if last.metrics is not None else (recorded.metrics if recorded else None)
        message = last.message if last.message is not None else (recorded.message if recorded else "")
        return replace(
            status,
            phase=StagePhase.SUCCEEDED,
            completion_time=last.finished,
            metrics=metrics,
            message=message,
        )
    failures = [a for a in attempts if a.state is JobState.FAILED]
    last_failure = ""
    if failures and (failures[-1] is not last or not exhausted(stage, last)):
        failure = failures[-1]
        last_failure = f"attempt {failure.attempt} failed: {_failure_text(failure, previous)}".rstrip(": ")
    if last.state is JobState.FAILED:
        if exhausted(stage, last):
            return replace(
                status,
                phase=StagePhase.FAILED,
                completion_time=last.finished,
                message=_failure_text(last, previous),
            )
        return replace(status, phase=StagePhase.RETRYING, message=last_failure)
    if last.state is JobState.SUSPENDED:
        phase = StagePhase.SUSPENDED if run.spec.suspend else StagePhase.QUEUED
        message = "; ".join(part for part in (last.admission, last_failure) if part)
        return replace(status, phase=phase, message=message)
    return replace(status, phase=StagePhase.RUNNING, message=last_failure)


def _queue_time(status: StageStatus, previous: StageStatus | None, now: str) -> StageStatus:
    """Carry the stage's admission wait: ``queuedSince`` while Queued, and the seconds of every
    wait that ended added into ``queuedSeconds`` (a preempted stage waits again)."""
    since = previous.queued_since if previous is not None else None
    waited = previous.queued_seconds if previous is not None else None
    if status.phase == StagePhase.QUEUED:
        return replace(status, queued_since=since or now, queued_seconds=waited)
    if since is not None:
        waited = (waited or 0.0) + max(0.0, (parse_time(now) - parse_time(since)).total_seconds())
    return replace(status, queued_since=None, queued_seconds=waited)


def _failure_text(failure: ObservedJob, previous: StageStatus | None) -> str:
    """Why an attempt failed: from its pods if they were read, else as the status recorded it."""
    if failure.message is not None:
        return failure.message
    if previous is not None and previous.message:
        prefix = f"attempt {failure.attempt} failed: "
        if previous.message.startswith(prefix):
            return previous.message[len(prefix) :]
        if previous.job_name == failure.name and previous.phase == StagePhase.FAILED:
            return previous.message
    return failure.reason


def _carry(previous: RunStatus | None, condition: Condition, now: str) -> Condition:
    """Keep lastTransitionTime unless the condition's status changed."""
    before = previous.condition(condition.type) if previous else None
    since = before.last_transition_time if before is not None and before.status == condition.status else None
    return replace(condition, last_transition_time=since or now)


def summarize(
    run: AlignmentRun,
    jobs: Sequence[ObservedJob],
    previous: RunStatus | None,
    errors: Sequence[FieldError],
    now: str,
    *,
    misfits: Sequence[str] = (),
) -> RunStatus:
    """The run's whole status, recomputed from its Jobs; ``now`` only stamps condition transitions.

    ``misfits`` are `kubealign.fit`'s messages for stages that cannot fit their GPUs.
    """
    by_stage = _by_stage(jobs)
    phases: dict[str, str] = {}
    stages: list[StageStatus] = []
    for stage in run.spec.stages:
        before = previous.stage(stage.name) if previous else None
        status = _queue_time(
            _stage_status(run, stage, by_stage.get(stage.name, []), before, phases), before, now
        )
        phases[stage.name] = status.phase
        stages.append(status)

    failed = [s for s in stages if s.phase == StagePhase.FAILED]
    succeeded = [s for s in stages if s.phase == StagePhase.SUCCEEDED]
    active = [s for s in stages if s.phase.active]
    started = [s.start_time for s in stages if s.start_time]
    generation = run.generation

    if errors:
        phase, reason = RunPhase.FAILED, "InvalidSpec"
        failure = "; ".join(str(e) for e in errors[:5])
    elif failed:
        phase, reason = RunPhase.FAILED, "StageFailed"
        first = failed[0]
        failure = f"stage {first.name} failed after {first.attempts} attempt(s): {first.message}".rstrip(": ")
    elif len(succeeded) == len(stages):
        phase, reason, failure = RunPhase.SUCCEEDED, "Succeeded", ""
    elif run.spec.suspend:
        phase, reason, failure = RunPhase.SUSPENDED, "Suspended", ""
    elif started:
        phase, reason, failure = RunPhase.RUNNING, "StagesRunning", ""
    else:
        phase, reason, failure = RunPhase.PENDING, "Pending", ""

    completion: str | None = None
    if phase == RunPhase.SUCCEEDED:
        completion = max((s.completion_time for s in stages if s.completion_time), default=now)
    elif phase == RunPhase.FAILED:
        recorded = previous.completion_time if previous and previous.phase == RunPhase.FAILED else None
        completion = max((s.completion_time for s in failed if s.completion_time), default=recorded or now)

    # A stage waiting for admission is marked in `kubectl get` (the Stage column), and Kueue's
    # reason is in the Progressing message (the Message column of `kubectl get -o wide`).
    running = ", ".join(f"{s.name}(queued)" if s.phase == StagePhase.QUEUED else s.name for s in active)
    going = [s.name for s in active if s.phase != StagePhase.QUEUED]
    waiting = "; ".join(
        f"{s.name} queued" + (f": {s.message}" if s.message else "")
        for s in active
        if s.phase == StagePhase.QUEUED
    )
    activity = "; ".join(part for part in (f"running: {', '.join(going)}" if going else "", waiting) if part)
    progress_message = {
        RunPhase.RUNNING: activity or "waiting for stages to start",
        RunPhase.PENDING: "no stage has started yet",
        RunPhase.SUSPENDED: "spec.suspend is true",
        RunPhase.SUCCEEDED: f"all {len(stages)} stages succeeded",
        RunPhase.FAILED: failure,
    }[phase]
    conditions = (
        Condition("Valid", "False", "InvalidSpec", failure)
        if errors
        else Condition("Valid", "True", "SpecValid"),
        Condition(
            "Progressing",
            "True" if phase in (RunPhase.RUNNING, RunPhase.PENDING) else "False",
            reason,
            progress_message,
        ),
        Condition(
            "Suspended",
            "True" if phase == RunPhase.SUSPENDED else "False",
            "Suspended" if phase == RunPhase.SUSPENDED else "NotSuspended",
        ),
        Condition(
            "Ready",
            "True" if phase == RunPhase.SUCCEEDED else "False",
            "Succeeded"
            if phase == RunPhase.SUCCEEDED
            else ("Failed" if phase == RunPhase.FAILED else "StagesIncomplete"),
            progress_message if phase.finished else f"{len(succeeded)}/{len(stages)} stages succeeded",
        ),
        Condition(
            "Failed",
            "True" if phase == RunPhase.FAILED else "False",
            reason if phase == RunPhase.FAILED else "NoFailure",
            failure,
        ),
        Condition("MemoryFits", "False", "EstimateExceedsGPUMemory", "; ".join(misfits))
        if misfits
        else Condition("MemoryFits", "True", "NoKnownMisfit"),
    )
    return RunStatus(
        phase=phase,
        observed_generation=generation,
        conditions=tuple(
            replace(_carry(previous, c, now), observed_generation=generation) for c in conditions
        ),
        start_time=min(started) if started else None,
        completion_time=completion,
        progress=f"{len(succeeded)}/{len(stages)}",
        running_stages=running.replace(", ", ","),
        stages=tuple(stages),
    )


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """A Kubernetes Event to post on the run."""

    type: str
    reason: str
    message: str


def _stage_note(before: StageStatus | None, after: StageStatus) -> Note | None:
    phase = before.phase if before else StagePhase.PENDING
    attempts = before.attempts if before else 0
    name = f"stage {after.name} ({after.type})"
    if (
        after.attempts > attempts
        and after.attempts > 1
        and after.phase in (StagePhase.RUNNING, StagePhase.QUEUED)
    ):
        return Note(
            "Warning",
            "StageRetrying",
            f"{name}: started attempt {after.attempts} as job {after.job_name} "
            f"after {after.message or 'a failure'}",
        )
    if after.phase == phase:
        return None
    if after.phase == StagePhase.RUNNING:
        verb = "resumed" if phase in (StagePhase.SUSPENDED, StagePhase.QUEUED) else "started"
        return Note(
            "Normal",
            "StageResumed" if verb == "resumed" else "StageStarted",
            f"{name} {verb}: job {after.job_name}",
        )
    if after.phase == StagePhase.QUEUED:
        return Note("Normal", "StageQueued", f"{name}: job {after.job_name} waits for admission")
    if after.phase == StagePhase.SUSPENDED:
        return Note("Normal", "StageSuspended", f"{name}: job {after.job_name} suspended")
    if after.phase == StagePhase.SUCCEEDED:
        metrics = f"; metrics {compact_json(after.metrics)}" if after.metrics else ""
        return Note(
            "Normal",
            "StageSucceeded",
            f"{name} succeeded after {after.attempts} attempt(s); artifact {after.output}{metrics}",
        )
    if after.phase == StagePhase.RETRYING:
        return Note("Warning", "StageAttemptFailed", f"{name}: {after.message}")
    if after.phase == StagePhase.FAILED:
        return Note(
            "Warning", "StageFailed", f"{name} failed after {after.attempts} attempt(s): {after.message}"
        )
    return None


def _newly_false(previous: RunStatus | None, current: RunStatus, kind: str) -> Condition | None:
    """The condition ``kind`` when it is False now and was not, or says something new."""
    now = current.condition(kind)
    before = previous.condition(kind) if previous else None
    if now is None or now.status != "False":
        return None
    if before is not None and before.status == "False" and before.message == now.message:
        return None
    return now


def transitions(previous: RunStatus | None, current: RunStatus) -> tuple[Note, ...]:
    """One Event per stage transition and per change of the run's phase or validity."""
    notes: list[Note] = []
    for stage in current.stages:
        note = _stage_note(previous.stage(stage.name) if previous else None, stage)
        if note is not None:
            notes.append(note)
    for kind, reason in (("Valid", "InvalidSpec"), ("MemoryFits", "StageWillNotFit")):
        failing = _newly_false(previous, current, kind)
        if failing is not None:
            notes.append(Note("Warning", reason, failing.message))
    before = previous.phase if previous else RunPhase.PENDING
    if current.phase != before:
        failed = current.condition("Failed")
        run_notes = {
            RunPhase.SUCCEEDED: Note("Normal", "RunSucceeded", f"all stages succeeded ({current.progress})"),
            RunPhase.FAILED: Note("Warning", "RunFailed", failed.message if failed else "run failed"),
            RunPhase.SUSPENDED: Note(
                "Normal", "RunSuspended", "spec.suspend is true: no new Jobs, running ones suspended"
            ),
            RunPhase.RUNNING: Note(
                "Normal",
                "RunResumed" if before == RunPhase.SUSPENDED else "RunStarted",
                f"stages: {current.running_stages}",
            ),
        }
        if current.phase in run_notes:
            notes.append(run_notes[current.phase])
    return tuple(notes)


def coalesce(notes: Sequence[Note]) -> tuple[Note, ...]:
    """The Events to post for one reconcile's notes: every Warning on its own (each is something to
    act on), and the Normal ones together as one Event with the first one's reason and every message.

    A hand-over (a stage succeeded, the next started) is then one Event, not two: Events are API
    writes, and at hundreds of concurrent runs they were the largest share of the operator's requests.
    """
    warnings = [note for note in notes if note.type != "Normal"]
    normal = [note for note in notes if note.type == "Normal"]
    merged = [Note("Normal", normal[0].reason, "; ".join(note.message for note in normal))] if normal else []
    return (*warnings, *merged)
