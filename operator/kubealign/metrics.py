"""Prometheus metrics of the operator: runs by phase, stage durations, stage retries, reconcile errors.

Everything is derived from what the operator already writes: a reconcile hands the run's status before
and after its patch to :meth:`OperatorMetrics.record_status_change`, and the transitions between the two
become observations. That keeps the handlers free of metric bookkeeping and makes restarts safe: the
first status an operator process sees for a run (``before=None``) only sets the phase gauge, so
durations and retries that an earlier process already counted are not counted twice.

Exposed series (names follow Prometheus conventions: base units, ``_total`` for counters)::

    kubealign_alignmentruns{phase}                        runs this operator knows, by status.phase
    kubealign_alignmentrun_phase{namespace,name,phase}    1 per run, labelled with its current phase
                                                          (the "failed run" alert names the run)
    kubealign_stage_queued_since_timestamp_seconds{namespace,run,stage,type}
                                                          when each stage waiting for Kueue began to
                                                          wait (the "queued too long" alert)
    kubealign_stage_duration_seconds{type,phase}          histogram: stage start -> terminal phase
    kubealign_stage_retries_total{type}                   attempts started beyond a stage's first
    kubealign_stage_queued_seconds{type}                  histogram: one wait for admission by Kueue
                                                          (Queued -> admitted), each wait once
    kubealign_reconcile_errors_total{reason}              reconcile failures (the resync retries),
                                                          and creates the API server refused
                                                          (reason CreateFailed: a quota, a webhook)
    kubealign_handover_seconds                            histogram: a stage's Job finished -> the
                                                          next attempt's Job created (as the operator saw it)
    kubealign_operator_leader                             1 on the replica holding the leader Lease
    kubealign_operator_queue_depth                        runs waiting for a reconcile
    kubealign_operator_api_requests_total{verb,resource}  the operator's own API requests (watches aside)

Served with :meth:`OperatorMetrics.serve` (``kubealign operator --metrics-port 9090``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubealign.api import RunPhase, StagePhase, parse_time

RUN_PHASES = tuple(RunPhase)
TERMINAL_STAGE_PHASES = (StagePhase.SUCCEEDED, StagePhase.FAILED)

# Stages run from seconds (tiny test models) to days (pretraining), so the buckets span both ends.
STAGE_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    3 * 3600.0,
    6 * 3600.0,
    12 * 3600.0,
    24 * 3600.0,
    72 * 3600.0,
    float("inf"),
)
# A hand-over is milliseconds when the operator keeps up and seconds when it does not.
HANDOVER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class _RunPhaseCollector(Collector):
    """Reports phases from live maps, so a deleted run (or an admitted stage) simply stops being counted.

    A plain labelled Gauge would need the previous phase of every run to decrement it; the maps are
    the single source of truth instead. The count by phase always reports every phase (zeros
    included), so dashboards and alerts never see those series vanish.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._queued: dict[tuple[str, str, str], tuple[str, float]] = {}  # -> (type, since)

    def set(self, key: tuple[str, str], phase: str) -> None:
        with self._lock:
            self._phases[key] = phase

    def set_queued(self, key: tuple[str, str], queued: Mapping[str, tuple[str, float]]) -> None:
        """The run's stages that wait for admission now: stage -> (type, since when)."""
        with self._lock:
            for gone in [k for k in self._queued if k[:2] == key]:
                del self._queued[gone]
            namespace, run = key
            for stage, value in queued.items():
                self._queued[(namespace, run, stage)] = value

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._phases.pop(key, None)
        self.set_queued(key, {})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            runs = sorted(self._phases.items())
            queued = sorted(self._queued.items())
        phases = [phase for _, phase in runs]
        family = GaugeMetricFamily(
            "kubealign_alignmentruns",
            "AlignmentRuns known to this operator, by status.phase.",
            labels=["phase"],
        )
        for phase in (*RUN_PHASES, *sorted(set(phases) - set(RUN_PHASES))):
            family.add_metric([phase], float(phases.count(phase)))
        yield family
        each = GaugeMetricFamily(
            "kubealign_alignmentrun_phase",
            "1 for each AlignmentRun this operator knows, labelled with its status.phase.",
            labels=["namespace", "name", "phase"],
        )
        for (namespace, name), phase in runs:
            each.add_metric([namespace, name, phase], 1.0)
        yield each
        waiting = GaugeMetricFamily(
            "kubealign_stage_queued_since_timestamp_seconds",
            "Unix time at which each stage now waiting for admission by Kueue began to wait.",
            labels=["namespace", "run", "stage", "type"],
        )
        for (namespace, run, stage), (stage_type, since) in queued:
            waiting.add_metric([namespace, run, stage, stage_type], since)
        yield waiting


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _stages_by_name(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    stages = (status or {}).get("stages") or []
    return {str(stage.get("name")): stage for stage in stages if isinstance(stage, Mapping)}


def _attempts(stage: Mapping[str, Any] | None) -> int:
    value = (stage or {}).get("attempts")
    return value if isinstance(value, int) else 0


class OperatorMetrics:
    """The operator's metric set, on its own registry so tests and processes never share counters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._runs = _RunPhaseCollector()
        self.registry.register(self._runs)
        self.stage_duration = Histogram(
            "kubealign_stage_duration_seconds",
            "Seconds from a stage's startTime to its terminal phase, retries included.",
            labelnames=["type", "phase"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stage_queued = Histogram(
            "kubealign_stage_queued_seconds",
            "Seconds one stage waited for admission by Kueue (each wait: the first, and after a preemption).",
            labelnames=["type"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stage_retries = Counter(
            "kubealign_stage_retries_total",
            "Stage attempts started after a failed attempt (each resumes from the latest checkpoint).",
            labelnames=["type"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubealign_reconcile_errors_total",
            "Reconcile handler failures, by reason (the exception class or the condition reason).",
            labelnames=["reason"],
            registry=self.registry,
        )

        self.handover = Histogram(
            "kubealign_handover_seconds",
            "Seconds from the watch event of a stage Job finishing to the creation of its run's next Job.",
            buckets=HANDOVER_BUCKETS,
            registry=self.registry,
        )
        self.leader = Gauge(
            "kubealign_operator_leader",
            "1 while this replica holds the leader Lease (or runs without leader election), else 0.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kubealign_operator_queue_depth",
            "AlignmentRuns waiting for a reconcile.",
            registry=self.registry,
        )
        self.api_requests = Counter(
            "kubealign_operator_api_requests_total",
            "API requests the operator sent (its watch streams aside), by HTTP verb and resource.",
            labelnames=["verb", "resource"],
            registry=self.registry,
        )

    def observe_handover(self, seconds: float) -> None:
        self.handover.observe(seconds)

    def set_leader(self, leading: bool) -> None:
        self.leader.set(1.0 if leading else 0.0)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(float(depth))

    def count_request(self, *, verb: str, resource: str) -> None:
        self.api_requests.labels(verb=verb, resource=resource).inc()

    def set_run_phase(self, *, namespace: str, name: str, phase: str) -> None:
        self._runs.set((namespace, name), phase)

    def forget_run(self, *, namespace: str, name: str) -> None:
        self._runs.forget((namespace, name))

    def count_reconcile_error(self, *, reason: str) -> None:
        self.reconcile_errors.labels(reason=reason).inc()

    def record_status_change(
        self,
        *,
        namespace: str,
        name: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any],
    ) -> None:
        """Turn one reconcile's status transition into observations.

        ``before`` is the status the reconcile started from, or None when this process has not seen
        the run yet (operator start, resume): then only the phase is recorded, since any finished
        stage or retry in it was observed by whichever process wrote it.
        """
        phase = after.get("phase")
        if isinstance(phase, str) and phase:
            self.set_run_phase(namespace=namespace, name=name, phase=phase)
        queued: dict[str, tuple[str, float]] = {}
        for stage_name, stage in _stages_by_name(after).items():
            since = _parse_time(stage.get("queuedSince"))
            if since is not None:
                queued[stage_name] = (str(stage.get("type") or "unknown"), since.timestamp())
        self._runs.set_queued((namespace, name), queued)
        if before is None:
            return
        old_stages = _stages_by_name(before)
        for stage_name, stage in _stages_by_name(after).items():
            old = old_stages.get(stage_name)
            stage_type = str(stage.get("type") or "unknown")
            retries = _attempts(stage) - max(_attempts(old), 1)
            if retries > 0:
                self.stage_retries.labels(type=stage_type).inc(retries)
            if (old or {}).get("queuedSince") and not stage.get("queuedSince"):  # a wait ended
                waited = float(stage.get("queuedSeconds") or 0) - float((old or {}).get("queuedSeconds") or 0)
                self.stage_queued.labels(type=stage_type).observe(max(waited, 0.0))
            stage_phase = stage.get("phase")
            if stage_phase not in TERMINAL_STAGE_PHASES or (old or {}).get("phase") == stage_phase:
                continue
            started = _parse_time(stage.get("startTime"))
            finished = _parse_time(stage.get("completionTime"))
            if started is not None and finished is not None and finished >= started:
                self.stage_duration.labels(type=stage_type, phase=str(stage_phase)).observe(
                    (finished - started).total_seconds()
                )

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape receives."""
        return generate_latest(self.registry)

    def serve(self, *, port: int, address: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port (useful with ``port=0``)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_port)


# The operator process's metrics; handlers record into this one, tests build their own.
OPERATOR_METRICS = OperatorMetrics()
