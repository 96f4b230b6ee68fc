"""One reconcile of one AlignmentRun: read the cache -> plan -> act -> one status write -> events.

The handlers feed every watch event into the Reconciler: the object goes into the cache
(kubealign.cache), and the run it concerns into the work queue (kubealign.workqueue), urgently when
one of its Jobs changed state. A bounded pool of worker threads takes runs from the queue; one run
is never reconciled by two workers at once, and a burst of events for it becomes one or two passes.

A reconcile costs no read when the cache can answer (it always can for the run and its Jobs); it
reads a finished Job's pods once, for the metrics or failure the status lacks. Its writes are only
what the plan needs: children of new attempts, suspend patches, one status write, its Events. The
resync is a pass over the cache, so a run that needs nothing costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubealign import api, fit, plan, render
from kubealign.cache import Cache, Key, key_of, resource_version
from kubealign.defaults import InstallDefaults
from kubealign.k8s import Kube, KubeError
from kubealign.k8s import now as utc_now
from kubealign.metrics import OPERATOR_METRICS, OperatorMetrics
from kubealign.tenancy import TenancyPolicy
from kubealign.workqueue import WorkQueue

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 16
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 16.0
PRIME_RETRY_SECONDS = 2.0
TERMINAL_RUN_PHASES = (api.RunPhase.SUCCEEDED, api.RunPhase.FAILED)


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


def _pods_tell(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``pods`` hold how the finished ``job`` ended: a pod of it in the Job's final phase."""
    seen = plan.observe_job(job)
    phase = "Succeeded" if seen is not None and seen.state == plan.JobState.SUCCEEDED else "Failed"
    return any(
        (pod.get("metadata", {}).get("labels") or {}).get(render.JOB_NAME_LABEL) == job["metadata"]["name"]
        and pod.get("status", {}).get("phase") == phase
        for pod in pods
    )


class Reconciler:
    """Drives runs towards their spec through a ``Kube``; fed from any thread, works in its own."""

    def __init__(
        self,
        kube: Kube,
        *,
        cache: Cache | None = None,
        clock: Callable[[], str] = utc_now,
        metrics: OperatorMetrics = OPERATOR_METRICS,
        defaults: InstallDefaults | None = None,
        tenancy: TenancyPolicy | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache if cache is not None else Cache()
        self.queue: WorkQueue[Key] = WorkQueue()
        self._clock = clock
        self.metrics = metrics
        # The chart's defaultTrainerImage and s3.* values, for runs whose spec leaves them out.
        self.defaults = defaults if defaults is not None else InstallDefaults.from_env()
        self.gpu_memory = fit.parse_memory(self.defaults.gpu_memory)
        # The chart's tenancy values: what runs may choose (images, accounts, tolerations, ...).
        self.tenancy = tenancy if tenancy is not None else TenancyPolicy.from_env()
        self._guard = threading.Lock()
        # Job name -> (uid, state) last seen, so that Job events which change nothing the planner
        # looks at (pods starting, ready counts) do not cost a reconcile.
        self._job_states: dict[tuple[str, str], tuple[str, plan.JobState]] = {}
        # Run -> the resourceVersion of the status this operator wrote last: its watch echo needs no pass.
        self._written: dict[Key, str] = {}
        # Run -> when (monotonic) a Job of it was seen finishing: the start of a hand-over.
        self._finished_at: dict[Key, float] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        # Held while threads are started or handed to stop(), so the two never interleave.
        self._starting = threading.Lock()
        # Run -> consecutive failed reconciles, and the timer that queues it again (see _retry_later).
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, threading.Timer] = {}

    # --- feeding: called by the watch handlers ---------------------------------------------------

    def run_event(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of an AlignmentRun."""
        key = key_of(body)
        if deleted:
            self.cache.delete_run(*key)
            with self._guard:
                self._written.pop(key, None)
                self._finished_at.pop(key, None)
                self._failures.pop(key, None)
            self.metrics.forget_run(namespace=key[0], name=key[1])
            return
        if not self.cache.put_run(body):
            return
        with self._guard:
            echo = self._written.get(key) == resource_version(body)
        if not echo:
            self.request(*key)

    def job_event(self, job: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of one of our Jobs: reconcile its run if the Job's state changed."""
        seen = plan.observe_job(job)
        meta = job.get("metadata", {})
        run = (meta.get("labels") or {}).get(render.LABEL_RUN)
        namespace = meta.get("namespace")
        if seen is None or not run or not namespace:
            return
        if deleted:
            self.cache.delete_job(job)
        elif not self.cache.put_job(job):
            return
        key = (namespace, seen.name)
        with self._guard:
            if deleted:
                self._job_states.pop(key, None)
            elif not self._note(key, str(meta.get("uid", "")), seen.state):
                return
            if seen.state == plan.JobState.SUCCEEDED and not deleted:
                self._finished_at[(namespace, run)] = time.monotonic()
        self.request(namespace, run, urgent=True)

    def pod_event(self, pod: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of a trainer pod: into the cache only. A pod's end reaches the planner
        through its Job's event (the Job finishes after its pods do)."""
        if deleted:
            self.cache.delete_pod(pod)
        else:
            self.cache.put_pod(pod)

    def workload_event(self, workload: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of a Kueue Workload: reconcile its run when Kueue's word on it changed (a
        queued stage's message shows why it waits, or that it was evicted)."""
        job = self.cache.workload_job(workload)
        if job is None:
            return
        before = plan.admission_message(self.cache.workload(*job))
        if deleted:
            self.cache.delete_workload(workload)
        elif not self.cache.put_workload(workload):
            return
        if plan.admission_message(self.cache.workload(*job)) == before:
            return
        run = self.cache.run_of_job(*job)
        if run is not None:
            self.request(job[0], run)

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

    def request(self, namespace: str, name: str, *, urgent: bool = False) -> None:
        """Queue the run for a reconcile (once, however often it is asked for before one starts)."""
        self.queue.add((namespace, name), urgent=urgent)

    def refresh(self, namespace: str, name: str) -> None:
        """Read the run and its Jobs from the API into the cache (a GET and a LIST), for callers that
        have no watch feeding it: tests, a one-off reconcile."""
        body = self.kube.get_run(namespace, name)
        if body is None:
            self.cache.delete_run(namespace, name)
            return
        self.cache.put_run(body)
        for job in self.kube.list("Job", namespace, selector=render.run_selector(name)):
            self.cache.put_job(job)

    def prime(self, namespaces: Sequence[str | None]) -> None:
        """Fill the cache with one LIST of runs and one of Jobs per namespace (None: all namespaces).

        The watches list everything too when they start, but nothing says when they are done; a
        new leader primes first, so that its first reconciles never mistake a Job the watch has not
        delivered yet for one that does not exist. Two requests per namespace, once per leadership.
        """
        selector = f"{render.LABEL_MANAGED_BY}={render.MANAGED_BY}"
        for namespace in namespaces:
            runs = self.kube.list(api.KIND, namespace)
            jobs = self.kube.list("Job", namespace, selector=selector)
            self.cache.retain(namespace, {key_of(body) for body in runs}, {key_of(job) for job in jobs})
            for body in runs:
                self.cache.put_run(body)
            for job in jobs:
                self.job_event(job)

    # --- working: a bounded pool of threads --------------------------------------------------------

    def start(
        self,
        *,
        workers: int = DEFAULT_WORKERS,
        resync_seconds: float | None = None,
        prime: Sequence[str | None] | None = None,
    ) -> None:
        """Start reconciling: ``workers`` threads, and a resync of every unfinished run (from the
        cache) each ``resync_seconds``. Every run already in the cache is queued first.

        With ``prime`` (namespaces, None for all) a thread of its own primes the cache first,
        retrying while the API is unreachable, and then starts the workers: the caller (the leader
        election, which must keep renewing) never waits for the API. After ``stop`` it starts again
        (a replica that lost leadership and won it back) with a fresh queue: what was queued before
        is covered by queueing every cached run."""
        with self._starting:
            if self._threads:
                raise RuntimeError("the reconciler is already running")
            self._stop.clear()
            self.queue = WorkQueue()
            if prime is None:
                self._spawn(workers, resync_seconds)
                return
            thread = threading.Thread(
                target=self._prime_then_spawn, args=(list(prime), workers, resync_seconds), name="prime"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def _prime_then_spawn(
        self, namespaces: list[str | None], workers: int, resync_seconds: float | None
    ) -> None:
        while not self._stop.is_set():
            try:
                self.prime(namespaces)
                break
            except KubeError as exc:
                logger.warning("could not list runs and Jobs to start from: %s; retrying", exc)
                self._stop.wait(PRIME_RETRY_SECONDS)
        with self._starting:
            self._spawn(workers, resync_seconds)

    def _spawn(self, workers: int, resync_seconds: float | None) -> None:
        """Start the threads (under ``_starting``), unless ``stop`` came first."""
        if self._stop.is_set():
            return
        for body in self.cache.runs():
            self.request(*key_of(body))
        for index in range(workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if resync_seconds:
            thread = threading.Thread(target=self._resync, args=(resync_seconds,), name="resync", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the workers after the reconciles in progress; False if some still ran after
        ``timeout`` seconds (all of them together)."""
        self._stop.set()
        self.queue.shutdown()
        with self._starting:
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stopped = not any(thread.is_alive() for thread in threads)
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()
        return stopped

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                self._reconcile_reporting(*key)
            except Exception:  # a bug in one run's reconcile must not take a worker away from the others
                logger.exception("reconcile of %s/%s crashed", *key)
                self.metrics.count_reconcile_error(reason="Exception")
            finally:
                self.queue.done(key)
            self.metrics.set_queue_depth(self.queue.depth())

    def _resync(self, seconds: float) -> None:
        # The safety net for anything missed (a request that failed, a create refused for now): a
        # pass over the cache, which costs API requests only for runs whose plan has something to do.
        while not self._stop.wait(seconds):
            for body in self.cache.runs():
                if (body.get("status") or {}).get("phase") not in TERMINAL_RUN_PHASES:
                    self.request(*key_of(body))

    def _reconcile_reporting(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        try:
            self.reconcile(namespace, name)
        except KubeError as exc:
            logger.warning("reconcile of %s/%s failed: %s", namespace, name, exc)
            self.metrics.count_reconcile_error(reason=exc.reason or "KubeError")
            self._retry_later(key)
            try:
                # Makes the problem visible on the run, when the API takes Events at all.
                self.kube.post_event(
                    {"metadata": {"namespace": namespace, "name": name}},
                    type="Warning",
                    reason="ReconcileError",
                    message=str(exc),
                )
            except KubeError as event_error:
                logger.debug("could not post the ReconcileError event: %s", event_error)
        else:
            with self._guard:
                self._failures.pop(key, None)

    def _retry_later(self, key: Key) -> None:
        """Queue a failed run again after an exponential backoff (client-go's per-item rate limiter:
        0.5 s doubling to 16 s), so an API hiccup costs seconds, not a resync period, and an outage
        costs a few requests per run, not a tight loop."""
        with self._guard:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            if key in self._retries or self._stop.is_set():
                return
            delay = min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
            timer = threading.Timer(delay, self._retry_now, args=(key,))
            timer.daemon = True
            self._retries[key] = timer
        timer.start()

    def _retry_now(self, key: Key) -> None:
        with self._guard:
            self._retries.pop(key, None)
        self.request(*key)

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """One full pass over the cached run; None when the run is not (or no longer) there."""
        cached = self.cache.run(namespace, name)
        if cached is None:
            self.metrics.forget_run(namespace=namespace, name=name)
            return None
        manifest = self.defaults.apply(cached)
        # The status is ours and already known to be well-formed; checking the spec is enough. Pods
        # need an image, which neither the run, its stages nor this install may have provided.
        errors = api.validate(
            {key: value for key, value in manifest.items() if key != "status"}, require_image=True
        ) + self.tenancy.violations(manifest)
        previous = api.RunStatus.from_dict(manifest.get("status"))
        try:
            run = api.AlignmentRun.from_manifest(manifest)
        except (KeyError, TypeError, ValueError):
            run = _placeholder(manifest)

        raw = self.cache.jobs(namespace, name)
        listed = [plan.observe_job(job) for job in raw.values()]
        # A Job left over from an earlier run of the same name is not ours; the garbage collector takes it.
        owned = [
            replace(job, admission=plan.admission_message(self.cache.workload(namespace, job.name)))
            if job.queued and job.state == plan.JobState.SUSPENDED
            else job
            for job in listed
            if job is not None and job.owner_uid == run.uid
        ]
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
        for _ in blocked:
            # A create the API server refused (a quota, an admission webhook) is a reconcile that
            # could not do its work: the errors metric and its alert see it, by the Event's reason.
            self.metrics.count_reconcile_error(reason="CreateFailed")
        body = status.to_dict()
        patched = body != manifest.get("status")
        if status.phase in TERMINAL_RUN_PHASES:
            with self._guard:
                self._finished_at.pop((namespace, name), None)
        if patched:
            stored = self.kube.replace_run_status(namespace, name, body)
            with self._guard:
                self._written[(namespace, name)] = resource_version(stored)
            self.cache.put_run(stored)
        # After the write: a transition that failed to persist is observed when it finally does.
        self.metrics.record_status_change(
            namespace=namespace, name=name, before=manifest.get("status"), after=body
        )
        for note in plan.coalesce(notes):
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
        """Re-observe, with their pods, finished Jobs whose metrics or failure the status lacks.

        The pods come from the cache; when it has not yet seen how a Job's pods ended (the pod and
        Job watches are separate streams), one LIST of the run's pods answers instead.
        """
        wanted = set(plan.jobs_needing_pods(jobs, previous))
        if not wanted:
            return list(jobs)
        pods: Sequence[Mapping[str, Any]] = self.cache.pods(namespace, name)
        if not all(_pods_tell(raw[job.name], pods) for job in jobs if job.name in wanted):
            pods = self.kube.list("Pod", namespace, selector=render.run_selector(name))
            for pod in pods:
                self.cache.put_pod(pod)
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
                    self.cache.put_job(created)
                    self._note_all(run.namespace, {created["metadata"]["name"]: created})
                    self._handed_over((run.namespace, run.name))
                    seen = plan.observe_job(created)
                    if seen is not None and seen.state in (plan.JobState.SUCCEEDED, plan.JobState.FAILED):
                        # It existed already (the cache had not seen it yet) and has finished: its
                        # outcome is in its pods, which a later pass would not read again.
                        pods = self.kube.list("Pod", run.namespace, selector=render.run_selector(run.name))
                        seen = plan.observe_job(created, pods)
                    if seen is not None and seen.owner_uid == run.uid:
                        current[seen.name] = seen
                else:
                    patched = self.kube.set_job_suspended(run.namespace, action.job, suspend=action.suspend)
                    self.cache.put_job(patched)
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

    def _handed_over(self, key: Key) -> None:
        """A stage's Job was created: if a Job of the run finished before, that was a hand-over."""
        with self._guard:
            finished = self._finished_at.pop(key, None)
        if finished is not None:
            self.metrics.observe_handover(time.monotonic() - finished)
