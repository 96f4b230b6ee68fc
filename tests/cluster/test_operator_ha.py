"""Two operator replicas with leader election, against the real control plane.

Both replicas are real ``kubealign operator --leader-elect`` processes; the leader is found through
each one's ``/leader`` endpoint, killed with SIGKILL (no chance to release the Lease), and the
standby must take over within the lease (10 s) plus a retry period, with no duplicate Job and
every run Succeeded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import localcluster
from kubealign.leader import LeaderElector, LeaseSettings
from tests.cluster.operator_harness import OperatorProcess, Reader, submit
from tests.operator.run_builders import manifest, src, stage, uri
from tests.processes import wait_until

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster

KWOK_RUN_SECONDS = "kubealign.io/kwok-run-seconds"
LEASE = "kubealign-operator"


def probe(port: int) -> dict[str, Any] | None:
    """The replica's /leader answer (its body says leader or not), or None while it is not serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/leader", timeout=2) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as error:
        return dict(json.load(error))
    except OSError:
        return None


def chain(name: str, stages: int, seconds: float) -> dict[str, Any]:
    return manifest(
        [
            stage(
                f"s{n}",
                "sft",
                inputs={
                    "model": uri("s3://m00/base") if n == 0 else src(f"s{n - 1}"),
                    "data": uri("s3://d00/sft"),
                },
                podAnnotations={KWOK_RUN_SECONDS: str(seconds)},
            )
            for n in range(stages)
        ],
        name=name,
    )


def elected(cluster: Cluster, namespace: str, log: Path, *, lease: str, port: int) -> OperatorProcess:
    """A ``kubealign operator --leader-elect`` process on ``lease``, serving /leader on ``port``."""
    return OperatorProcess(
        cluster,
        namespace,
        log,
        "--leader-elect",
        f"--leader-election-namespace={namespace}",
        f"--leader-election-name={lease}",
        f"--health-address=127.0.0.1:{port}",
    )


def succeeded_once(reader: Reader, names: list[str], *, timeout: float) -> None:
    """Every chain Succeeded with one attempt per stage and no duplicate: one Job per stage, the
    first attempt of each."""
    for name in names:
        status = reader.wait_phase(name, "Succeeded", timeout=timeout)
        assert [entry["attempts"] for entry in status["stages"]] == [1, 1, 1, 1]
        assert sorted(reader.jobs(name)) == [f"{name}-s{n}-1" for n in range(4)]


def test_both_replicas_elect_one_leader_and_the_standby_takes_over_a_sigkill(
    cluster: Cluster, namespace: str, crd: None, reader: Reader, tmp_path: Path
) -> None:
    ports = localcluster.pick_free_ports(2)
    replicas = [
        elected(cluster, namespace, tmp_path / f"operator-{index}.log", lease=LEASE, port=port)
        for index, port in enumerate(ports)
    ]
    try:
        # Started at once: exactly one leads, and the other becomes a ready standby (on a loaded
        # machine its first readiness can come a moment after the leader's election).
        states = wait_until(
            "both replicas to serve and be ready, one leading",
            lambda: (
                (s := [probe(port) for port in ports])
                and all(s)
                and sum(bool(item and item["leader"]) for item in s) == 1
                and all(item and item["ready"] is True for item in s)
                and s
            ),
            timeout=60,
        )
        leader = next(index for index, state in enumerate(states) if state["leader"])
        standby = 1 - leader
        lease = reader.kube.get_lease(namespace, LEASE)
        assert lease is not None and lease["spec"]["holderIdentity"] == states[leader]["identity"]
        for _ in range(6):  # the standby never becomes a second leader while the leader renews
            time.sleep(0.5)
            assert probe(ports[standby]) == {**states[standby], "leader": False}

        names = [f"ha-{index}" for index in range(3)]
        for name in names:
            submit(cluster, namespace, chain(name, 4, 1.5))
        wait_until(
            "every run to start its second stage",
            lambda: all(reader.stage(n, "s1").get("phase") for n in names),
            timeout=90,
        )

        replicas[leader].kill()
        killed = time.monotonic()
        wait_until(
            "the standby to lead",
            lambda: (p := probe(ports[standby])) and p["leader"],
            timeout=30,
            interval=0.2,
        )
        failover = time.monotonic() - killed
        # A 10 s lease, renewed every 2 s: at most about 12 s, never the time a new pod needs.
        assert failover < 15, f"failover took {failover:.1f}s"

        succeeded_once(reader, names, timeout=120)
        lease, now_leading = reader.kube.get_lease(namespace, LEASE), probe(ports[standby])
        assert lease is not None and now_leading is not None
        assert lease["spec"]["holderIdentity"] == now_leading["identity"]
        assert lease["spec"]["leaseTransitions"] >= 1
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.kill()


def test_a_leader_that_stops_cleanly_hands_over_at_once(
    cluster: Cluster, namespace: str, reader: Reader
) -> None:
    events: list[str] = []

    def elector(identity: str) -> LeaderElector:
        settings = LeaseSettings(namespace=namespace, name="handover", identity=identity)
        return LeaderElector(
            reader.kube,
            settings,
            on_started=lambda: events.append(f"{identity} leads"),
            on_stopped=lambda: events.append(f"{identity} lost"),
        )

    first, second = elector("first"), elector("second")
    stops = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=e.run, args=(stop,)) for e, stop in zip((first, second), stops, strict=True)
    ]
    threads[0].start()
    wait_until("first to lead", lambda: first.is_leader, timeout=30)
    threads[1].start()
    time.sleep(3)
    assert not second.is_leader
    stops[0].set()  # a clean stop releases the Lease
    released = time.monotonic()
    threads[0].join(10)
    wait_until("second to lead", lambda: second.is_leader, timeout=10, interval=0.1)
    # No lease to wait out: the standby's next retry (2 s) takes it.
    assert time.monotonic() - released < 5
    stops[1].set()
    threads[1].join(10)
    assert events == ["first leads", "second leads"]
    lease = reader.kube.get_lease(namespace, "handover")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""


OUTAGE_SECONDS = 60


def test_the_operator_rides_out_an_api_server_restart_and_a_60_second_outage(
    cluster: Cluster, namespace: str, crd: None, reader: Reader, tmp_path: Path
) -> None:
    if cluster.state_dir is None:
        pytest.skip("restarts the API server: needs the cluster the tests started themselves")
    port = localcluster.pick_free_ports(1)[0]
    log = tmp_path / "operator.log"
    operator = elected(cluster, namespace, log, lease="outage", port=port)
    try:
        wait_until("the operator to lead", lambda: (p := probe(port)) and p["leader"], timeout=60)
        names = [f"outage-{index}" for index in range(3)]
        for name in names:
            submit(cluster, namespace, chain(name, 4, 2.0))
        wait_until(
            "every run to start its second stage",
            lambda: all(reader.stage(n, "s1").get("phase") for n in names),
            timeout=90,
        )
        before = {name: set(reader.jobs(name)) for name in names}

        tool = str(localcluster.REPO_ROOT / "tools" / "cluster")
        restart = subprocess.run(
            [
                sys.executable, tool, "restart", "kube-apiserver",
                f"--down-seconds={OUTAGE_SECONDS}", f"--state-dir={cluster.state_dir}",
            ],
            capture_output=True, text=True, timeout=OUTAGE_SECONDS + 180, check=False,
        )  # fmt: skip
        assert restart.returncode == 0, restart.stderr
        back = time.monotonic()
        assert operator.process.poll() is None, f"the operator exited:\n{log.read_text()[-3000:]}"

        # The outage outlasted the renew deadline, so leadership was lost; with the API back the
        # same process leads again at its next retry.
        wait_until("the operator to lead again", lambda: (p := probe(port)) and p["leader"], timeout=30)
        relead = time.monotonic() - back
        assert relead < 15, f"leading again took {relead:.1f}s"
        # The control plane's own controllers (job controller, kwok) need tens of seconds to recover
        # their watches; the runs finish after that.
        succeeded_once(reader, names, timeout=240)
        # Every hand-over after the outage: the next stage's Job is created as soon as the job
        # controller has marked the previous one complete (timestamps have 1 s resolution).
        handovers = []
        for name in names:
            jobs = reader.jobs(name)
            for n in range(1, 4):
                previous, current = jobs[f"{name}-s{n - 1}-1"], jobs[f"{name}-s{n}-1"]
                if f"{name}-s{n}-1" not in before[name]:
                    done = datetime.fromisoformat(previous["status"]["completionTime"])
                    created = datetime.fromisoformat(current["metadata"]["creationTimestamp"])
                    handovers.append((created - done).total_seconds())
        print(f"leading again {relead:.1f}s after the API returned; hand-overs after it: {handovers} s")
        assert handovers and max(handovers) <= 2, handovers
        text = log.read_text()
        assert "lost leadership" in text and "campaigning for the lease again" in text
        assert "crashed" not in text and "Traceback" not in text, text[-3000:]
    finally:
        if operator.process.poll() is None:
            operator.kill()
