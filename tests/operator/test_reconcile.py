"""kubealign.reconcile's scheduling logic: requests for one run coalesce, Job events that change no
state are dropped. The reconcile itself is replaced by a recorder; it is covered against the real
API server in tests/cluster/test_operator_runs.py."""

from __future__ import annotations

import threading
from typing import Any

from kubealign.k8s import Kube
from kubealign.reconcile import Outcome, Reconciler
from tests.operator.run_builders import job


class Recorder(Reconciler):
    """Records reconciles; the first one of each run blocks until released."""

    def __init__(self) -> None:
        super().__init__(Kube(None))
        self.calls: list[tuple[str, str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        with self._lock:
            self.calls.append((namespace, name))
            first = self.calls.count((namespace, name)) == 1
        if first and name == "slow":
            self.entered.set()
            assert self.release.wait(10)
        return None


def test_requests_during_a_reconcile_coalesce_into_one_more_pass() -> None:
    recorder = Recorder()
    worker = threading.Thread(target=recorder.request, args=("ns", "slow"))
    worker.start()
    assert recorder.entered.wait(10)
    # Five more requests while the first pass runs: each returns at once.
    for _ in range(5):
        recorder.request("ns", "slow")
    # Another run is not held up by the slow one.
    recorder.request("ns", "other")
    assert recorder.calls == [("ns", "slow"), ("ns", "other")]
    recorder.release.set()
    worker.join(10)
    assert recorder.calls == [("ns", "slow"), ("ns", "other"), ("ns", "slow")]
    # Once idle, a request runs again.
    recorder.request("ns", "slow")
    assert recorder.calls.count(("ns", "slow")) == 3


def with_uid(body: dict[str, Any], uid: str) -> dict[str, Any]:
    body["metadata"]["uid"] = uid
    return body


def test_job_events_reconcile_only_when_the_job_state_changes() -> None:
    recorder = Recorder()
    events = [
        (with_uid(job("demo", "sft"), "u1"), False),  # first sight: reconcile
        (with_uid(job("demo", "sft"), "u1"), False),  # a pod became ready: nothing the planner reads
        (with_uid(job("demo", "sft", state="succeeded"), "u1"), False),  # Complete: reconcile
        (with_uid(job("demo", "sft", state="succeeded"), "u1"), False),
        (with_uid(job("demo", "sft", state="succeeded"), "u1"), True),  # deleted: reconcile
        (with_uid(job("demo", "sft"), "u2"), False),  # re-created under the same name: reconcile
    ]
    for body, deleted in events:
        recorder.job_event(body, deleted=deleted)
    assert recorder.calls == [("team-a", "demo")] * 4


def test_job_events_without_our_labels_are_ignored() -> None:
    recorder = Recorder()
    foreign = job("demo", "sft")
    del foreign["metadata"]["labels"]["kubealign.io/run"]
    recorder.job_event(foreign)
    assert recorder.calls == []
