"""One reconcile of one AlignmentRun: read -> plan -> act -> one status write -> events.

Handlers call ``Reconciler.request(namespace, name)`` for every event that may concern a run (the
run changed, one of its Jobs changed, the resync timer fired). Requests for the same run are
coalesced: while a reconcile runs, further requests only mark the run dirty, and one more reconcile
follows. That keeps reconciles of a run strictly sequential (no two threads create the same stage)
and turns a burst of Job events into one or two passes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubealign import api, fit, plan, render
from kubealign.defaults import InstallDefaults
from kubealign.k8s import Kube, KubeError
from kubealign.k8s import now as utc_now
from kubealign.metrics import OPERATOR_METRICS, OperatorMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did, for logs and tests."""

    status: api.RunStatus
    actions: tuple[plan.Action, ...]
    notes: tuple[plan.Note, ...]
    patched: bool


def _placeholder(manifest: Mapping[str, Any]) -> api.AlignmentRun:
    """A stage-less run for a manifest too malformed to parse: enough to report why."""
    meta = manifest.get("metadata", {})
    return api.AlignmentRun(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        spec=api.RunSpec(stages=(), storage=api.Storage(uri="")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 0)),
    )


class Reconciler:
    """Drives runs towards their spec through a ``Kube``; safe to call from many threads."""

    def __init__(
        self,
        kube: Kube,
        *,
        clock: Callable[[], str] = utc_now,
        metrics: OperatorMetrics = OPERATOR_METRICS,
        defaults: InstallDefaults | None = None,
    ) -> None:
        self.kube = kube
        self._clock = clock
        self.metrics = metrics
        # The chart's defaultTrainerImage and s3.* values, for runs whose spec leaves them out.
        self.defaults = defaults if defaults is not None else InstallDefaults.from_env()
        self.gpu_memory = fit.parse_memory(self.defaults.gpu_memory)
        self._guard = threading.Lock()
        # (namespace, name) -> whether another pass was requested while one is running.
        self._running: dict[tuple[str, str], bool] = {}
        # Job name -> (uid, state) last seen, so that Job events which change nothing the planner
        # looks at (pods starting, ready counts) do not cost a reconcile.
        self._job_states: dict[tuple[str, str], tuple[str, plan.JobState]] = {}

    def job_event(self, job: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of one of our Jobs: reconcile its run if the Job's state changed."""
        seen = plan.observe_job(job)
        meta = job.get("metadata", {})
        run = (meta.get("labels") or {}).get(render.LABEL_RUN)
        namespace = meta.get("namespace")
        if seen is None or not run or not namespace:
            return
        key = (namespace, seen.name)
        with self._guard:
            if deleted:
                self._job_states.pop(key, None)
            elif not self._note(key, str(meta.get("uid", "")), seen.state):
                return
        self.request(namespace, run)

    def _note(self, key: tuple[str, str], uid: str, state: plan.JobState) -> bool:
        """Record a Job's state (under the guard); True if it differs from the last one seen."""
        changed = self._job_states.get(key) != (uid, state)
        self._job_states[key] = (uid, state)
        return changed

    def _note_all(self, namespace: str, jobs: Mapping[str, Mapping[str, Any]]) -> None:
        with self._guard:
            for name, job in jobs.items():
                seen = plan.observe_job(job)
                if seen is not None:
                    self._note((namespace, name), str(job["metadata"].get("uid", "")), seen.state)

    def request(self, namespace: str, name: str) -> None:
        """Reconcile the run now, or right after the reconcile of it already in progress."""
        key = (namespace, name)
        with self._guard:
            if key in self._running:
                self._running[key] = True
                return
            self._running[key] = False
        try:
            while True:
                self._reconcile_reporting(namespace, name)
                with self._guard:
                    if not self._running[key]:
                        return
                    self._running[key] = False
        finally:
            with self._guard:
                self._running.pop(key, None)

    def _reconcile_reporting(self, namespace: str, name: str) -> None:
        try:
            self.reconcile(namespace, name)
        except KubeError as exc:
            # The resync timer retries; the Event makes the problem visible on the run.
            logger.warning("reconcile of %s/%s failed: %s", namespace, name, exc)
            self.metrics.count_reconcile_error(reason=exc.reason or "KubeError")
            self.kube.post_event(
                {"metadata": {"namespace": namespace, "name": name}},
                type="Warning",
                reason="ReconcileError",
                message=str(exc),
            )

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """One full pass; None when the run no longer exists."""
        manifest = self.kube.get_run(namespace, name)
        if manifest is None:
            self.metrics.forget_run(namespace=namespace, name=name)
            return None
        manifest = self.defaults.apply(manifest)
        # The status is ours and already known to be well-formed; checking the spec is enough. Pods
        # need an image, which neither the run, its stages nor this install may have provided.
        errors = api.validate(
            {key: value for key, value in manifest.items() if key != "status"}, require_image=True
        )
        previous = api.RunStatus.from_dict(manifest.get("status"))
        try:
            run = api.AlignmentRun.from_manifest(manifest)
        except (KeyError, TypeError, ValueError):
            run = _placeholder(manifest)

        raw = {
            job["metadata"]["name"]: job
            for job in self.kube.list("Job", namespace, selector=render.run_selector(name))
        }
        self._note_all(namespace, raw)
        listed = [plan.observe_job(job) for job in raw.values()]
        # A Job left over from an earlier run of the same name is not ours; the garbage collector takes it.
        owned = [job for job in listed if job is not None and job.owner_uid == run.uid]
        observed = self._with_outcomes(namespace, name, owned, raw, previous)

        actions = () if errors else plan.decide(run, observed)
        observed, blocked = self._act(run, actions, observed)

        misfits = () if errors else fit.misfits(run, self.gpu_memory)
        status = plan.summarize(run, observed, previous, errors, self._clock(), misfits=misfits)
        status = replace(
            status,
            stages=tuple(
                replace(s, message=blocked[s.name]) if s.name in blocked else s for s in status.stages
            ),
        )
        notes = plan.transitions(previous, status) + tuple(
            plan.Note("Warning", "CreateFailed", f"stage {stage}: {message}")
            for stage, message in blocked.items()
        )
        body = status.to_dict()
        patched = body != manifest.get("status")
        if patched:
            self.kube.replace_run_status(namespace, name, body)
        # After the write: a transition that failed to persist is observed when it finally does.
        self.metrics.record_status_change(
            namespace=namespace, name=name, before=manifest.get("status"), after=body
        )
        for note in notes:
            self.kube.post_event(manifest, type=note.type, reason=note.reason, message=note.message)
        for note in notes:
            logger.info("%s/%s %s: %s", namespace, name, note.reason, note.message)
        return Outcome(status=status, actions=actions, notes=notes, patched=patched)

    def _with_outcomes(
        self,
        namespace: str,
        name: str,
        jobs: Sequence[plan.ObservedJob],
        raw: Mapping[str, Mapping[str, Any]],
        previous: api.RunStatus,
    ) -> list[plan.ObservedJob]:
        """Re-observe, with their pods, finished Jobs whose metrics or failure the status lacks."""
        wanted = set(plan.jobs_needing_pods(jobs, previous))
        if not wanted:
            return list(jobs)
        pods = self.kube.list("Pod", namespace, selector=render.run_selector(name))
        result: list[plan.ObservedJob] = []
        for job in jobs:
            seen = plan.observe_job(raw[job.name], pods) if job.name in wanted else None
            result.append(seen or job)
        return result

    def _act(
        self, run: api.AlignmentRun, actions: Sequence[plan.Action], jobs: Sequence[plan.ObservedJob]
    ) -> tuple[list[plan.ObservedJob], dict[str, str]]:
        """Carry out the actions; return the Jobs as they are now and the stages that could not start."""
        current = {job.name: job for job in jobs}
        blocked: dict[str, str] = {}
        for action in actions:
            try:
                if isinstance(action, plan.CreateAttempt):
                    stage = run.spec.stage(action.stage)
                    created: dict[str, Any] = {}
                    for child in render.build_children(run, stage, action.attempt):
                        created = self.kube.create(child)
                    self._note_all(run.namespace, {created["metadata"]["name"]: created})
                    seen = plan.observe_job(created)
                    if seen is not None and seen.owner_uid == run.uid:
                        current[seen.name] = seen
                else:
                    patched = self.kube.set_job_suspended(run.namespace, action.job, suspend=action.suspend)
                    self._note_all(run.namespace, {action.job: patched})
                    seen = plan.observe_job(patched)
                    if seen is not None:
                        current[seen.name] = replace(current.get(seen.name, seen), state=seen.state)
            except KubeError as exc:
                if isinstance(action, plan.CreateAttempt):
                    blocked[action.stage] = f"could not create attempt {action.attempt}: {exc.message}"
                else:
                    logger.warning("could not set suspend=%s on job %s: %s", action.suspend, action.job, exc)
        return list(current.values()), blocked
