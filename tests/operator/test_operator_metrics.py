"""The operator's Prometheus metrics: status transitions become observations, scraped over real HTTP."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubealign.metrics import OperatorMetrics


def _stage(
    name: str, phase: str, *, attempts: int = 1, end: str | None = None, kind: str = "sft"
) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": name,
        "type": kind,
        "phase": phase,
        "attempts": attempts,
        "startTime": "2026-01-01T00:00:00Z",
    }
    if end is not None:
        stage["completionTime"] = end
    return stage


def _samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition text the way Prometheus does, keyed by sample name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_runs_by_phase_follow_status_and_deletion() -> None:
    metrics = OperatorMetrics()
    metrics.record_status_change(namespace="a", name="r1", before=None, after={"phase": "Running"})
    metrics.record_status_change(namespace="a", name="r2", before=None, after={"phase": "Running"})
    metrics.record_status_change(namespace="b", name="r1", before=None, after={"phase": "Pending"})
    metrics.record_status_change(
        namespace="a", name="r1", before={"phase": "Running"}, after={"phase": "Succeeded"}
    )
    samples = _samples(metrics)
    assert samples[("kubealign_alignmentruns", (("phase", "Running"),))] == 1
    assert samples[("kubealign_alignmentruns", (("phase", "Succeeded"),))] == 1
    assert samples[("kubealign_alignmentruns", (("phase", "Pending"),))] == 1
    # Every known phase is always exported, so a dashboard never loses a series.
    assert samples[("kubealign_alignmentruns", (("phase", "Suspended"),))] == 0
    metrics.forget_run(namespace="a", name="r2")
    assert _samples(metrics)[("kubealign_alignmentruns", (("phase", "Running"),))] == 0


@pytest.mark.parametrize(
    ("before", "after", "retries", "durations"),
    [
        # A stage finishing observes its duration once, labelled with its type and outcome.
        ([_stage("s", "Running")], [_stage("s", "Succeeded", end="2026-01-01T00:01:30Z")], 0, [90.0]),
        # The same terminal status seen again (a later reconcile) observes nothing.
        (
            [_stage("s", "Succeeded", end="2026-01-01T00:01:30Z")],
            [_stage("s", "Succeeded", end="2026-01-01T00:01:30Z")],
            0,
            [],
        ),
        # A second attempt is one retry; a jump from 1 to 3 attempts is two.
        ([_stage("s", "Running")], [_stage("s", "Running", attempts=2)], 1, []),
        ([_stage("s", "Running")], [_stage("s", "Running", attempts=3)], 2, []),
        # A stage that first appears already on attempt 2 counts one retry.
        ([], [_stage("s", "Running", attempts=2)], 1, []),
        # Failure after retries: both the retry and the failed duration.
        (
            [_stage("s", "Running", attempts=2)],
            [_stage("s", "Failed", attempts=3, end="2026-01-01T00:00:10Z")],
            1,
            [10.0],
        ),
        # Missing or inverted timestamps observe no duration rather than a bogus one.
        ([_stage("s", "Running")], [_stage("s", "Succeeded")], 0, []),
        ([_stage("s", "Running")], [_stage("s", "Succeeded", end="2025-12-31T00:00:00Z")], 0, []),
    ],
)
def test_stage_transitions(
    before: list[dict[str, Any]], after: list[dict[str, Any]], retries: int, durations: list[float]
) -> None:
    metrics = OperatorMetrics()
    metrics.record_status_change(
        namespace="ns",
        name="run",
        before={"phase": "Running", "stages": before},
        after={"phase": "Running", "stages": after},
    )
    samples = _samples(metrics)
    assert samples.get(("kubealign_stage_retries_total", (("type", "sft"),)), 0.0) == retries
    outcome = after[0]["phase"]
    key = ("kubealign_stage_duration_seconds_count", (("phase", outcome), ("type", "sft")))
    assert samples.get(key, 0.0) == len(durations)
    assert samples.get(
        ("kubealign_stage_duration_seconds_sum", (("phase", outcome), ("type", "sft"))), 0.0
    ) == sum(durations)


def test_first_sight_after_restart_counts_nothing_twice() -> None:
    metrics = OperatorMetrics()
    status = {"phase": "Running", "stages": [_stage("s", "Failed", attempts=3, end="2026-01-01T00:00:10Z")]}
    metrics.record_status_change(namespace="ns", name="run", before=None, after=status)
    samples = _samples(metrics)
    assert samples[("kubealign_alignmentruns", (("phase", "Running"),))] == 1
    assert not any(name.startswith("kubealign_stage_") and value for (name, _), value in samples.items())


def test_scrape_over_http() -> None:
    metrics = OperatorMetrics()
    metrics.count_reconcile_error(reason="ApiException")
    metrics.count_reconcile_error(reason="ApiException")
    metrics.record_status_change(
        namespace="ns",
        name="run",
        before={"phase": "Running", "stages": [_stage("d", "Running", kind="dpo")]},
        after={
            "phase": "Succeeded",
            "stages": [_stage("d", "Succeeded", end="2026-01-01T00:00:03Z", kind="dpo")],
        },
    )
    port = metrics.serve(port=0, address="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["kubealign_alignmentruns"].type == "gauge"
    assert families["kubealign_stage_duration_seconds"].type == "histogram"
    assert families["kubealign_stage_retries"].type == "counter"
    errors = [s for s in families["kubealign_reconcile_errors"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in errors] == [({"reason": "ApiException"}, 2.0)]
    buckets = {
        s.labels["le"]: s.value
        for s in families["kubealign_stage_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["1.0"] == 0 and buckets["5.0"] == 1 and buckets["+Inf"] == 1


def test_each_wait_for_admission_is_observed_once() -> None:
    metrics = OperatorMetrics()
    queued = {**_stage("s", "Queued"), "queuedSince": "2026-01-01T00:00:00Z"}
    admitted = {**_stage("s", "Running"), "queuedSeconds": 12.0}
    requeued = {**_stage("s", "Queued"), "queuedSince": "2026-01-01T00:05:00Z", "queuedSeconds": 12.0}
    again = {**_stage("s", "Running"), "queuedSeconds": 17.0}
    for before, after in [
        (queued, queued),
        (queued, admitted),
        (admitted, admitted),
        (admitted, requeued),
        (requeued, again),
    ]:
        metrics.record_status_change(
            namespace="ns", name="run", before={"stages": [before]}, after={"stages": [after]}
        )
    samples = _samples(metrics)
    assert samples[("kubealign_stage_queued_seconds_count", (("type", "sft"),))] == 2
    assert samples[("kubealign_stage_queued_seconds_sum", (("type", "sft"),))] == 17.0


def test_each_run_reports_its_phase_and_each_waiting_stage_when_it_began_to_wait() -> None:
    metrics = OperatorMetrics()
    queued = {**_stage("sft", "Queued"), "queuedSince": "2026-01-01T00:00:10Z"}
    # First sight (an operator restart) already reports both: alerts need no transition.
    metrics.record_status_change(
        namespace="a", name="r", before=None, after={"phase": "Running", "stages": [queued]}
    )
    metrics.record_status_change(namespace="a", name="bad", before=None, after={"phase": "Failed"})
    samples = _samples(metrics)
    assert (
        samples[("kubealign_alignmentrun_phase", (("name", "r"), ("namespace", "a"), ("phase", "Running")))]
        == 1
    )
    assert (
        samples[("kubealign_alignmentrun_phase", (("name", "bad"), ("namespace", "a"), ("phase", "Failed")))]
        == 1
    )
    waiting = (
        "kubealign_stage_queued_since_timestamp_seconds",
        (("namespace", "a"), ("run", "r"), ("stage", "sft"), ("type", "sft")),
    )
    assert samples[waiting] == 1767225610.0  # 2026-01-01T00:00:10Z
    # Admitted: the stage's series goes; a new phase replaces the run's old one.
    running = _stage("sft", "Running")
    metrics.record_status_change(
        namespace="a",
        name="r",
        before={"phase": "Running", "stages": [queued]},
        after={"phase": "Succeeded", "stages": [running]},
    )
    samples = _samples(metrics)
    assert waiting not in samples
    phases = [key for key in samples if key[0] == "kubealign_alignmentrun_phase" and ("name", "r") in key[1]]
    assert phases == [
        ("kubealign_alignmentrun_phase", (("name", "r"), ("namespace", "a"), ("phase", "Succeeded")))
    ]
    metrics.forget_run(namespace="a", name="bad")
    assert not [key for key in _samples(metrics) if ("name", "bad") in key[1]]
