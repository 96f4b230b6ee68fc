"""kubealign.leader against an in-memory Lease store that can go unreachable: a leader that cannot
renew steps down, campaigns again while the API is away, and leads again when it returns; a
clean stop releases the Lease. Two real electors racing over the real API server are covered in
tests/cluster/test_operator_ha.py."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import kubernetes
import pytest

import localcluster
from kubealign.k8s import Kube, KubeError
from kubealign.leader import LeaderElector, LeaseSettings
from tests.processes import wait_until


class LeaseStore(Kube):
    """get/create/replace of one Lease with resourceVersion checks; ``down`` refuses every call."""

    def __init__(self) -> None:
        super().__init__(None)
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = threading.Event()

    def _reachable(self) -> None:
        if self.down.is_set():
            raise KubeError(0, "Unreachable", "connection refused")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._reachable()
        return copy.deepcopy(self.lease)

    def create_lease(self, lease: Any) -> dict[str, Any]:
        self._reachable()
        if self.lease is not None:
            raise KubeError(409, "AlreadyExists", "lease exists")
        return self._store(lease)

    def replace_lease(self, lease: Any) -> dict[str, Any]:
        self._reachable()
        assert self.lease is not None
        if lease["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "stale resourceVersion")
        return self._store(lease)

    def _store(self, lease: Any) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(dict(lease))
        stored["metadata"] = {**stored["metadata"], "resourceVersion": str(self.version)}
        self.lease = stored
        return copy.deepcopy(stored)


FAST = {"lease_seconds": 2.0, "renew_deadline_seconds": 1.2, "retry_seconds": 0.2}


def test_a_leader_that_cannot_renew_steps_down_and_leads_again_when_the_api_returns() -> None:
    store = LeaseStore()
    events: list[str] = []
    elector = LeaderElector(
        store,
        LeaseSettings(namespace="ns", name="lock", identity="me", **FAST),
        on_started=lambda: events.append("started"),
        on_stopped=lambda: events.append("stopped"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=elector.run, args=(stop,))
    thread.start()
    try:
        wait_until("leadership", lambda: elector.is_leader, timeout=10, interval=0.02)
        store.down.set()
        outage = time.monotonic()
        wait_until("stepping down", lambda: events == ["started", "stopped"], timeout=10, interval=0.02)
        # The deadline counts from the last renewal, at most one retry before the outage began; and
        # leading ends before the lease could expire for the others.
        elapsed = time.monotonic() - outage
        assert FAST["renew_deadline_seconds"] - FAST["retry_seconds"] <= elapsed < FAST["lease_seconds"]
        assert not elector.is_leader and thread.is_alive()
        time.sleep(0.5)
        assert events == ["started", "stopped"]  # campaigning, not leading, while the API is away
        store.down.clear()
        wait_until(
            "leading again", lambda: events == ["started", "stopped", "started"], timeout=10, interval=0.02
        )
        assert elector.is_leader
    finally:
        stop.set()
        thread.join(5)
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == ""  # released


def test_a_lease_held_by_another_is_taken_only_after_it_stops_changing() -> None:
    store = LeaseStore()
    holder = LeaderElector(
        store, LeaseSettings(namespace="ns", name="lock", identity="holder", **FAST),
        on_started=lambda: None, on_stopped=lambda: None,
    )  # fmt: skip
    candidate = LeaderElector(
        store, LeaseSettings(namespace="ns", name="lock", identity="candidate", **FAST),
        on_started=lambda: None, on_stopped=lambda: None,
    )  # fmt: skip
    stops = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=e.run, args=(s,)) for e, s in zip((holder, candidate), stops, strict=True)
    ]
    threads[0].start()
    try:
        wait_until("holder to lead", lambda: holder.is_leader, timeout=10, interval=0.02)
        threads[1].start()
        time.sleep(3 * FAST["lease_seconds"])
        assert holder.is_leader and not candidate.is_leader
    finally:
        for stop, thread in zip(stops, threads, strict=True):
            stop.set()
            if thread.ident is not None:
                thread.join(5)


def test_the_stop_budget_ends_before_another_replica_can_take_the_lease() -> None:
    settings = LeaseSettings(namespace="ns", name="lock", identity="me")
    elector = LeaderElector(LeaseStore(), settings, on_started=lambda: None, on_stopped=lambda: None)
    # Stepping down is noticed at most one retry after the renew deadline; the budget fits before expiry.
    spent = settings.renew_deadline_seconds + settings.retry_seconds + elector.stop_budget_seconds()
    assert elector.stop_budget_seconds() > 0 and spent <= settings.lease_seconds
    with pytest.raises(ValueError, match="lease_seconds > renew_deadline_seconds"):
        LeaseSettings(namespace="ns", name="lock", identity="me", lease_seconds=5, renew_deadline_seconds=5)


def test_an_unreachable_api_server_is_a_kube_error_not_a_crash() -> None:
    (port,) = localcluster.pick_free_ports(1)  # nothing listens there
    configuration = kubernetes.client.Configuration()
    configuration.host = f"https://127.0.0.1:{port}"
    configuration.retries = 0
    kube = Kube(kubernetes.client.ApiClient(configuration))
    with pytest.raises(KubeError) as raised:
        kube.get_lease("ns", "lock")
    assert raised.value.status == 0 and raised.value.reason == "Unreachable"
    assert "refused" in raised.value.message.lower()
