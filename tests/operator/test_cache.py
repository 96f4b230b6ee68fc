"""kubealign.cache: the newest version of each run and Job wins, whatever order they arrive in."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign.cache import Cache, is_older
from tests.operator.run_builders import job


def run(name: str, version: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": name, "resourceVersion": version},
        "status": {"phase": phase},
    }


@pytest.mark.parametrize(
    ("candidate", "held", "older"),
    [
        ("9", "10", True),  # numerically older, though "9" > "10" as strings
        ("10", "10", False),  # the watch echo of the operator's own write
        ("11", "10", False),
        ("abc", "10", False),  # not an etcd revision: the later arrival wins
        ("", "10", False),
    ],
)
def test_is_older_compares_revisions_as_numbers(candidate: str, held: str, older: bool) -> None:
    assert (
        is_older({"metadata": {"resourceVersion": candidate}}, {"metadata": {"resourceVersion": held}})
        is older
    )


def test_an_older_run_never_replaces_a_newer_one() -> None:
    cache = Cache()
    assert cache.put_run(run("demo", "12", "Succeeded"))  # the operator's own status write
    assert not cache.put_run(run("demo", "11"))  # the watch delivers an earlier version late
    held = cache.run("team-a", "demo")
    assert held is not None and held["status"]["phase"] == "Succeeded"
    assert cache.put_run(run("demo", "13", "Failed"))
    cache.delete_run("team-a", "demo")
    assert cache.run("team-a", "demo") is None
    assert cache.runs() == []


def test_jobs_are_indexed_by_their_run_label() -> None:
    cache = Cache()
    sft, dpo = job("demo", "sft", state="succeeded"), job("demo", "dpo")
    other = job("other", "sft")
    for body, version in ((sft, "5"), (dpo, "6"), (other, "7")):
        body["metadata"]["resourceVersion"] = version
        assert cache.put_job(body)
    assert sorted(cache.jobs("team-a", "demo")) == sorted([sft["metadata"]["name"], dpo["metadata"]["name"]])
    assert cache.sizes() == (0, 3, 0)
    stale = job("demo", "sft")
    stale["metadata"]["resourceVersion"] = "4"
    assert not cache.put_job(stale)
    assert cache.jobs("team-a", "demo")[sft["metadata"]["name"]] is sft
    cache.delete_job(sft)
    cache.delete_job(dpo)
    assert cache.jobs("team-a", "demo") == {}
    unlabelled = job("demo", "sft")
    del unlabelled["metadata"]["labels"]["kubealign.io/run"]
    assert not cache.put_job(unlabelled)


def test_pods_keep_only_what_the_planner_reads() -> None:
    cache = Cache()
    pod: dict[str, Any] = {
        "metadata": {
            "namespace": "team-a",
            "name": "demo-sft-1-abcde",
            "resourceVersion": "8",
            "labels": {"kubealign.io/run": "demo", "batch.kubernetes.io/job-name": "demo-sft-1"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {}}]},
    }
    assert cache.put_pod(pod)
    (kept,) = cache.pods("team-a", "demo")
    assert "spec" not in kept and "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == pod["metadata"]["annotations"]
    assert kept["status"] == pod["status"]
    older = {**pod, "metadata": {**pod["metadata"], "resourceVersion": "7"}, "status": {"phase": "Running"}}
    assert not cache.put_pod(older)
    cache.delete_pod(pod)
    assert cache.pods("team-a", "demo") == []
