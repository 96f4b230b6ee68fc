"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's semantics.

Every replica runs the watches (so a standby's cache is warm when it takes over); only the holder
of the Lease reconciles. The rules are those of client-go's leaderelection package, which the
kube-controller-manager and the scheduler use:

- The holder renews ``spec.renewTime`` every ``retry_seconds``. If it cannot renew for
  ``renew_deadline_seconds`` it stops leading: the operator stops its reconciles within
  ``stop_budget_seconds`` (before anyone else can take the Lease) or exits, and then campaigns
  again like any standby.
- A candidate takes the Lease when the holder is empty, or when the Lease record has not changed
  for ``lease_seconds`` *as measured on the candidate's own monotonic clock* since it first saw
  that record. Clocks of different machines are never compared, so clock skew cannot make two
  leaders.
- Every write is a PUT carrying the resourceVersion that was read: of two candidates racing for an
  expired Lease, exactly one write succeeds (the other gets 409 Conflict).
- A leader that stops cleanly (SIGTERM, a drain) releases the Lease: the holder is cleared, and a
  standby takes it at its next retry instead of waiting out the lease.

With the defaults (10 s lease, 2 s retry) a standby takes over at most about 12 s after the
leader dies without releasing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubealign.k8s import Kube, KubeError

logger = logging.getLogger(__name__)


def micro_time() -> str:
    """Now as a Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    lease_seconds: float = 10.0
    renew_deadline_seconds: float = 7.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_seconds > self.renew_deadline_seconds > self.retry_seconds > 0:
            raise ValueError(
                "leader election needs lease_seconds > renew_deadline_seconds > retry_seconds > 0"
            )


class LeaderElector:
    """Campaigns for the Lease in ``run()`` (a thread's body) until ``stop`` is set.

    ``on_started`` is called each time this replica becomes leader; ``on_stopped`` each time it
    stops leading for any reason other than ``stop`` being set (lost renewals, the Lease taken),
    after which it campaigns again: an API outage longer than the renew deadline costs leadership,
    not the process.
    """

    def __init__(
        self,
        kube: Kube,
        settings: LeaseSettings,
        *,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._clock = clock
        self._leading = threading.Event()
        # The last Lease spec seen and when (our clock) it was first seen: expiry is judged from it.
        self._observed: Mapping[str, Any] | None = None
        self._observed_at = 0.0

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def run(self, stop: threading.Event) -> None:
        retry = self.settings.retry_seconds
        while not stop.is_set():
            while not stop.is_set() and not self._try_acquire_or_renew():
                stop.wait(retry)
            if stop.is_set():
                return
            logger.info("became leader (lease %s/%s)", self.settings.namespace, self.settings.name)
            self._leading.set()
            self._on_started()
            renewed = self._clock()
            while not stop.wait(retry):
                if self._try_acquire_or_renew():
                    renewed = self._clock()
                elif self._clock() - renewed >= self.settings.renew_deadline_seconds or not self._holds():
                    break
            else:
                self.release()
                return
            self._leading.clear()
            logger.error("lost leadership: the lease was not renewed in time or was taken over")
            # on_stopped has until the lease expires for others to stop what it had in flight; it
            # sets ``stop`` if it could not, and otherwise this replica campaigns again.
            self._on_stopped()

    def stop_budget_seconds(self) -> float:
        """How long after losing leadership this replica may take to stop acting: another replica
        can take the Lease ``lease_seconds`` after our last renewal, and we give up leading
        ``renew_deadline_seconds`` after it; one retry period is kept as a margin."""
        settings = self.settings
        return max(0.0, settings.lease_seconds - settings.renew_deadline_seconds - settings.retry_seconds)

    def _holds(self) -> bool:
        """Whether the last Lease seen names us (it may name another once someone took it over)."""
        return self._observed is None or self._observed.get("holderIdentity") in (
            self.settings.identity,
            None,
        )

    def _lease_body(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        now = micro_time()
        spec = dict((current or {}).get("spec") or {})
        ours = spec.get("holderIdentity") == self.settings.identity
        spec.update(
            holderIdentity=self.settings.identity,
            leaseDurationSeconds=int(self.settings.lease_seconds),
            renewTime=now,
        )
        if not ours:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if current else 0)
        metadata: dict[str, Any] = {"name": self.settings.name, "namespace": self.settings.namespace}
        if current is not None:
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _observe(self, lease: Mapping[str, Any]) -> None:
        spec = dict(lease.get("spec") or {})
        if spec != self._observed:
            self._observed = spec
            self._observed_at = self._clock()

    def _try_acquire_or_renew(self) -> bool:
        try:
            current = self.kube.get_lease(self.settings.namespace, self.settings.name)
            if current is None:
                created = self.kube.create_lease(self._lease_body(None))
                self._observe(created)
                return True
            self._observe(current)
            holder = (current.get("spec") or {}).get("holderIdentity")
            if holder and holder != self.settings.identity:
                duration = float((current.get("spec") or {}).get("leaseDurationSeconds") or 0)
                if self._clock() - self._observed_at < max(duration, self.settings.lease_seconds):
                    return False
                logger.info("lease held by %s expired; taking it over", holder)
            self._observe(self.kube.replace_lease(self._lease_body(current)))
            return True
        except KubeError as exc:
            # 409: another replica wrote first; anything else: the API is unreachable. Both retry.
            logger.debug("leader election attempt failed: %s", exc)
            return False
        except Exception:
            # Anything else is a bug, but it must not end this thread while it holds the Lease:
            # count it as a failed attempt, so that leading stops at the renew deadline.
            logger.exception("leader election attempt crashed")
            return False

    def release(self) -> None:
        """Give the Lease up if we hold it, so that a standby need not wait for it to expire."""
        if not self._leading.is_set():
            return
        self._leading.clear()
        try:
            current = self.kube.get_lease(self.settings.namespace, self.settings.name)
            spec = (current or {}).get("spec") or {}
            if current is None or spec.get("holderIdentity") != self.settings.identity:
                return
            body = self._lease_body(current)
            body["spec"].update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time())
            self.kube.replace_lease(body)
            logger.info("released the lease %s/%s", self.settings.namespace, self.settings.name)
        except KubeError as exc:
            logger.warning("could not release the lease: %s", exc)
