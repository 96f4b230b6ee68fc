"""kubealign.reconcile's feeding and scheduling: watch events go into the cache, a run is queued only
when something the planner reads changed, the echo of the operator's own status write costs
nothing, and runs whose Jobs moved jump the queue. The reconcile itself is covered against the
real API server in tests/cluster/test_operator_runs.py."""

from __future__ import annotations

import threading
import time
from typing import Any

from kubealign.k8s import Kube, KubeError
from kubealign.reconcile import Outcome, Reconciler
from tests.operator.run_builders import job
from tests.processes import wait_until


class Recorder(Reconciler):
    """Records reconciles instead of doing them; "slow" runs block until released."""

    def __init__(self) -> None:
        super().__init__(Kube(None))
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        with self._lock:
            self.calls.append((namespace, name))
        if name == "slow":
            self.entered.set()
            assert self.release.wait(10)
        return None


def queued(reconciler: Reconciler) -> list[tuple[str, str]]:
    keys = []
    while (key := reconciler.queue.get(timeout=0)) is not None:
        keys.append(key)
        reconciler.queue.done(key)
    return keys


def with_uid(body: dict[str, Any], uid: str, version: str = "1") -> dict[str, Any]:
    body["metadata"]["uid"] = uid
    body["metadata"]["resourceVersion"] = version
    return body


def run_body(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": name, "resourceVersion": version}, "spec": {}}


def test_job_events_queue_their_run_only_when_the_job_state_changes() -> None:
    recorder = Recorder()
    events = [
        (with_uid(job("demo", "sft"), "u1", "1"), False),  # first sight: reconcile
        (with_uid(job("demo", "sft"), "u1", "2"), False),  # a pod became ready: nothing the planner reads
        (with_uid(job("demo", "sft", state="succeeded"), "u1", "3"), False),  # Complete: reconcile
        (with_uid(job("demo", "sft", state="succeeded"), "u1", "4"), False),
        (with_uid(job("demo", "sft", state="succeeded"), "u1", "5"), True),  # deleted: reconcile
        (with_uid(job("demo", "sft"), "u2", "6"), False),  # re-created under the same name: reconcile
    ]
    counts = []
    for body, deleted in events:
        recorder.job_event(body, deleted=deleted)
        counts.append(len(queued(recorder)))
    assert counts == [1, 0, 1, 0, 1, 1]
    assert next(iter(recorder.cache.jobs("team-a", "demo").values()))["metadata"]["uid"] == "u2"


def test_job_events_without_our_labels_are_ignored() -> None:
    recorder = Recorder()
    foreign = job("demo", "sft")
    del foreign["metadata"]["labels"]["kubealign.io/run"]
    recorder.job_event(foreign)
    assert queued(recorder) == []
    assert recorder.cache.sizes() == (0, 0, 0)


def test_the_echo_of_our_own_status_write_and_stale_versions_cost_no_reconcile() -> None:
    recorder = Recorder()
    recorder.run_event(run_body("demo", "10"))
    assert queued(recorder) == [("team-a", "demo")]
    # What a reconcile does after its status PATCH: the stored run goes into the cache.
    stored = run_body("demo", "12")
    recorder.cache.put_run(stored)
    recorder._written[("team-a", "demo")] = "12"
    recorder.run_event(run_body("demo", "11"))  # an older version delivered late
    recorder.run_event(run_body("demo", "12"))  # the watch echo of our write
    assert queued(recorder) == []
    assert recorder.cache.run("team-a", "demo") == stored
    recorder.run_event(run_body("demo", "13"))  # someone else changed it
    assert queued(recorder) == [("team-a", "demo")]
    recorder.run_event(run_body("demo", "13"), deleted=True)
    assert recorder.cache.run("team-a", "demo") is None


def test_runs_whose_jobs_moved_are_reconciled_before_new_runs() -> None:
    recorder = Recorder()
    for index in range(5):
        recorder.run_event(run_body(f"new-{index}", "1"))
    recorder.job_event(with_uid(job("going", "sft", state="succeeded"), "u1"))
    assert queued(recorder)[0] == ("team-a", "going")


def test_workers_reconcile_in_parallel_and_one_run_never_twice_at_once() -> None:
    recorder = Recorder()
    recorder.start(workers=2)
    try:
        recorder.request("ns", "slow")
        assert recorder.entered.wait(10)
        # Requests for the slow run while it is being reconciled: one more pass, after it.
        for _ in range(5):
            recorder.request("ns", "slow")
        # Another run is not held up by the slow one: the second worker takes it.
        recorder.request("ns", "other")
        deadline = threading.Event()
        for _ in range(100):
            if ("ns", "other") in recorder.calls:
                break
            deadline.wait(0.05)
        assert recorder.calls == [("ns", "slow"), ("ns", "other")]
        recorder.release.set()
        for _ in range(100):
            if recorder.calls.count(("ns", "slow")) == 2:
                break
            deadline.wait(0.05)
        assert recorder.calls.count(("ns", "slow")) == 2
    finally:
        recorder.release.set()
        recorder.stop()


def test_a_stopped_reconciler_starts_again_with_every_cached_run_queued() -> None:
    recorder = Recorder()
    recorder.run_event(run_body("demo", "1"))
    recorder.start(workers=1)
    wait_until("first pass", lambda: recorder.calls == [("team-a", "demo")], timeout=10, interval=0.02)
    assert recorder.stop(timeout=5)
    recorder.request("team-a", "lost")  # while stopped: dropped, nothing works on it
    recorder.start(workers=1)
    try:
        wait_until(
            "pass after restart",
            lambda: recorder.calls == [("team-a", "demo")] * 2,
            timeout=10,
            interval=0.02,
        )
    finally:
        assert recorder.stop(timeout=5)


def test_stop_reports_a_reconcile_that_outlives_its_budget() -> None:
    recorder = Recorder()
    recorder.start(workers=1)
    try:
        recorder.request("ns", "slow")
        assert recorder.entered.wait(10)
        assert not recorder.stop(timeout=0.2)
    finally:
        recorder.release.set()


class Unreachable(Kube):
    """Every request fails as it does while the API server is down."""

    def __init__(self) -> None:
        super().__init__(None)
        self.events = 0

    def post_event(self, run: Any, **_: Any) -> None:
        self.events += 1
        raise KubeError(0, "Unreachable", "connection refused")


class Failing(Reconciler):
    """Fails its first ``failures`` reconciles with a KubeError, then succeeds."""

    def __init__(self, failures: int) -> None:
        super().__init__(Unreachable())
        self.failures = failures
        self.times: list[float] = []

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        self.times.append(time.monotonic())
        if len(self.times) <= self.failures:
            raise KubeError(0, "Unreachable", "connection refused")
        return None


def test_a_failed_reconcile_is_retried_with_a_growing_backoff_and_no_crash() -> None:
    failing = Failing(failures=3)
    failing.start(workers=1)
    try:
        failing.request("ns", "demo")
        wait_until(
            "the pass after three failures", lambda: len(failing.times) == 4, timeout=10, interval=0.02
        )
        gaps = [later - earlier for earlier, later in zip(failing.times, failing.times[1:], strict=False)]
        # 0.5 s, 1 s, 2 s: exponential, not a resync period, not a tight loop.
        assert [round(gap * 2) / 2 for gap in gaps] == [0.5, 1.0, 2.0]
        assert isinstance(failing.kube, Unreachable) and failing.kube.events == 3  # failed Events: no crash
        time.sleep(1.5)
        assert len(failing.times) == 4  # success ends the retries
    finally:
        assert failing.stop(timeout=5)


class Listing(Kube):
    def __init__(self, runs: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
        super().__init__(None)
        self.listed = {"AlignmentRun": runs, "Job": jobs}

    def list(self, kind: str, namespace: str | None, **_: Any) -> list[dict[str, Any]]:
        return self.listed[kind]


def test_priming_drops_runs_and_jobs_deleted_while_no_watch_delivered() -> None:
    kept, gone = run_body("kept", "5"), run_body("gone", "3")
    kept_job, gone_job = with_uid(job("kept", "sft"), "u1"), with_uid(job("kept", "rm"), "u2")
    other_namespace = {"metadata": {"namespace": "team-b", "name": "elsewhere", "resourceVersion": "1"}}
    reconciler = Reconciler(Listing(runs=[kept], jobs=[kept_job]))
    for body in (kept, gone, other_namespace):
        reconciler.cache.put_run(body)
    for body in (kept_job, gone_job):
        reconciler.cache.put_job(body)
    reconciler.prime(["team-a"])
    assert reconciler.cache.run("team-a", "kept") is not None
    assert reconciler.cache.run("team-a", "gone") is None
    assert reconciler.cache.run("team-b", "elsewhere") is not None  # another namespace's LIST decides
    assert list(reconciler.cache.jobs("team-a", "kept")) == [kept_job["metadata"]["name"]]
