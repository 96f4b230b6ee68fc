#!/usr/bin/env python3
"""The operator at scale: hand-over latency, API requests per stage transition, memory, failover.

    .venv/bin/python tools/bench/operator_scale.py --runs 200 --stages 4 --nodes 1000
    .venv/bin/python tools/bench/operator_scale.py --runs 50 --nodes 100 --replicas 2 --kill-leader 3
    .venv/bin/python tools/bench/operator_scale.py --stock ...      # upstream controller-manager limits

It starts its own local control plane (tools/cluster up, the production-like profile unless
``--stock``), installs the CRD, and runs ``kubealign operator`` as ``--replicas`` real processes
(with ``--leader-elect`` when more than one) scoped to a fresh namespace. It submits ``--runs``
runs at once whose stages form a chain (each reads the previous one's model), so every stage but
the first starts exactly when its predecessor's Job completes; kwok completes each pod after
``--pod-seconds``.

- Hand-over latency: a watch on the namespace's Jobs stamps, on this machine's monotonic clock,
  the event in which stage N's Job reports Complete and the event in which stage N+1's Job
  appears (watch delivery delays cancel out).
- Requests: the operator's own, from its ``kubealign_operator_api_requests_total`` metric, by verb
  and resource (watch streams are long-lived and not counted). A killed replica's counts die with
  it, so with ``--kill-leader`` they are a lower bound.
- Peak RSS (VmHWM) and CPU seconds of each operator process, from /proc.
- ``--kill-leader K``: SIGKILLs the leader K times while the runs go, restarting it as a
  Deployment would; failover is the time from the kill to a replica's ``/leader`` answering 200.
  Duplicate Jobs are Jobs beyond one per stage (none may exist).

The last line is ``p95_ms <value> requests_per_transition <value>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from kubealign import api, render
from kubealign.k8s import Kube

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_TOOL = REPO_ROOT / "tools" / "cluster"
sys.path.insert(0, str(REPO_ROOT / "tools"))

from localcluster import pick_free_ports  # noqa: E402

MAX_STAGES = 32
LEASE = "kubealign-operator"
REQUEST_SERIES = re.compile(
    r'^kubealign_operator_api_requests_total\{resource="([^"]+)",verb="([^"]+)"\} ([0-9.e+]+)$', re.M
)


def chain(run: str, stages: int, pod_seconds: float) -> dict[str, Any]:
    def inputs(index: int) -> dict[str, Any]:
        data = {"uri": "s3://bench/data"}
        model = {"uri": "s3://bench/base"} if index == 0 else {"from": f"s{index - 1}"}
        return {"model": model, "data": data}

    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": run},
        "spec": {
            "image": "kubealign/trainer:bench",
            "storage": {"uri": "s3://bench/runs"},
            "podAnnotations": {"kubealign.io/kwok-run-seconds": str(pod_seconds)},
            "stages": [{"name": f"s{i}", "type": "sft", "inputs": inputs(i)} for i in range(stages)],
        },
    }


class JobClock:
    """Watches the namespace's Jobs and stamps when each is first seen and first seen Complete."""

    def __init__(self, client: Any, namespace: str) -> None:
        self.created: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self._batch = kubernetes.client.BatchV1Api(client)
        self._namespace = namespace
        self._watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The stream ends with an error when stop() or the namespace's deletion cuts it; by then
        # every stamp has been taken.
        with contextlib.suppress(urllib3.exceptions.HTTPError, kubernetes.client.ApiException):
            self._stamp()

    def _stamp(self) -> None:
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
            self._batch.list_namespaced_job, self._namespace, timeout_seconds=3600
        ):
            now = time.monotonic()
            job = event["object"]
            name = job.metadata.name
            self.created.setdefault(name, now)
            conditions = job.status.conditions or []
            if any(c.type == "Complete" and c.status == "True" for c in conditions):
                self.completed.setdefault(name, now)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._watch.stop()  # type: ignore[no-untyped-call]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def kubectl(kubeconfig: str, context: str, *args: str, stdin: str | None = None) -> str:
    binary = subprocess.run(
        [sys.executable, str(CLUSTER_TOOL), "which", "kubectl"], capture_output=True, text=True, check=True
    ).stdout.strip()
    result = subprocess.run(
        [binary, f"--kubeconfig={kubeconfig}", f"--context={context}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def proc_status(pid: int, field_name: str) -> int:
    """A kB field of /proc/PID/status (VmHWM: peak resident memory), in bytes; 0 once it is gone."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
        if match:
            return int(match.group(1)) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Replica:
    """One ``kubealign operator`` process, its metrics and health ports, and what it cost."""

    kubeconfig: str
    context: str
    namespace: str
    election: bool
    log: Path
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0
    peak_rss: int = 0
    cpu: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        self.metrics_port, self.health_port = pick_free_ports(2)
        args = [
            sys.executable, "-m", "kubealign.cli", "operator", "--namespace", self.namespace,
            f"--kubeconfig={self.kubeconfig}", f"--context={self.context}",
            f"--metrics-port={self.metrics_port}", f"--health-address=127.0.0.1:{self.health_port}",
        ]  # fmt: skip
        if self.election:
            args += [
                "--leader-elect",
                f"--leader-election-namespace={self.namespace}",
                f"--leader-election-name={LEASE}",
            ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def leader(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/leader", timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def sample(self) -> None:
        """Record peak memory, CPU and the request counters while the process lives."""
        if not self.alive() or self.process is None:
            return
        self.peak_rss = max(self.peak_rss, proc_status(self.process.pid, "VmHWM"))
        self.cpu = max(self.cpu, cpu_seconds(self.process.pid))
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as reply:
                text = reply.read().decode()
            self.requests = Counter(
                {
                    f"{verb} {resource}": int(float(value))
                    for resource, verb, value in REQUEST_SERIES.findall(text)
                }
            )

    def kill(self) -> None:
        if self.alive() and self.process is not None:
            self.sample()
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.alive() and self.process is not None:
            self.sample()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wait(what: str, check: Any, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def measure(
    kubeconfig: str,
    context: str,
    *,
    runs: int,
    stages: int,
    pod_seconds: float,
    replicas: int,
    kill_leader: int,
    logs: Path,
) -> None:
    namespace = f"bench-{secrets.token_hex(3)}"
    kubectl(
        kubeconfig,
        context,
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO_ROOT / "crds" / api.CRD_FILE),
    )
    kubectl(
        kubeconfig, context, "wait", "--for=condition=Established", f"crd/{api.CRD_NAME}", "--timeout=60s"
    )
    kubectl(kubeconfig, context, "create", "namespace", namespace)
    client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, persist_config=False
    )
    observer = Kube.connect(kubeconfig=kubeconfig, context=context)
    members = [
        Replica(kubeconfig, context, namespace, replicas > 1, logs / f"operator-{index}.log")
        for index in range(replicas)
    ]
    retired: list[Replica] = []
    clock = JobClock(client, namespace)
    failovers: list[float] = []
    try:
        for member in members:
            member.start()
        wait("a leader", lambda: any(member.leader() for member in members), timeout=60)
        clock.start()
        started = time.monotonic()
        names = [f"chain{n}" for n in range(runs)]
        for name in names:
            kubectl(
                kubeconfig,
                context,
                "create",
                "-n",
                namespace,
                "-f",
                "-",
                stdin=json.dumps(chain(name, stages, pod_seconds)),
            )
        # Kills spread over the run's expected length: one stage's time apart, from the second stage on.
        kill_times = [started + (pod_seconds + 2) * (1 + k) for k in range(kill_leader)]
        deadline = time.monotonic() + 120 + stages * (pod_seconds + 5) + runs * 0.5 + kill_leader * 20
        pending = set(names)
        while pending:
            for member in members:
                member.sample()
            if kill_times and time.monotonic() >= kill_times[0]:
                kill_times.pop(0)
                leader = next((member for member in members if member.leader()), None)
                if leader is not None:
                    leader.kill()
                    killed = time.monotonic()
                    others = [member for member in members if member is not leader]
                    wait(
                        "a new leader",
                        lambda: any(m.leader() for m in others),  # noqa: B023 (called right here)
                        timeout=60,
                    )
                    failovers.append(time.monotonic() - killed)
                    # The Deployment restarts the pod: a fresh replica joins as a standby.
                    retired.append(leader)
                    members[members.index(leader)] = replacement = Replica(
                        kubeconfig, context, namespace, True, logs / f"operator-restart-{len(retired)}.log"
                    )
                    replacement.start()
            for name in list(pending):
                if (observer.get_run(namespace, name) or {}).get("status", {}).get("phase") == "Succeeded":
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} runs did not succeed in time, e.g. {sorted(pending)[:3]}")
            time.sleep(0.2)
        wall = time.monotonic() - started
        # Let the last status writes and events settle before reading the counters.
        time.sleep(1.5)
        for member in members:
            member.sample()
        jobs = observer.list("Job", namespace)
    finally:
        clock.stop()
        for member in members:
            member.stop()
        kubectl(kubeconfig, context, "delete", "namespace", namespace, "--wait=false")

    latencies = []
    for name in names:
        for index in range(1, stages):
            done = clock.completed.get(render.job_name(name, f"s{index - 1}", 1))
            created = clock.created.get(render.job_name(name, f"s{index}", 1))
            if done is None or created is None:
                raise SystemExit(f"{name}: missing watch events around stage s{index}")
            latencies.append((created - done) * 1000)
    spent: Counter[str] = Counter()
    for member in (*members, *retired):
        spent += member.requests
    transitions = runs * stages
    total = sum(spent.values())
    duplicates = len(jobs) - transitions
    everyone = (*members, *retired)
    print(
        f"runs: {runs} x {stages} chained stages, pods run {pod_seconds}s, {replicas} replica(s), "
        f"wall {wall:.1f}s"
    )
    print(f"stage hand-over latency (Job Complete -> next Job created), {len(latencies)} hand-overs:")
    print(
        f"  p50 {percentile(latencies, 0.5):.0f} ms   p95 {percentile(latencies, 0.95):.0f} ms   "
        f"max {max(latencies):.0f} ms   mean {statistics.fmean(latencies):.0f} ms"
    )
    print(
        f"operator API requests: {total} for {transitions} stage transitions = "
        f"{total / transitions:.2f} per transition"
    )
    for key, count in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {key:32s} {count:6d}  ({count / transitions:.2f} per transition)")
    print(
        "operator processes: peak RSS "
        + ", ".join(f"{member.peak_rss / 2**20:.0f} MB" for member in everyone)
        + "; CPU "
        + ", ".join(f"{member.cpu:.1f} s" for member in everyone)
    )
    if kill_leader:
        print(
            f"leader kills: {len(failovers)}, failover "
            + ", ".join(f"{seconds:.1f} s" for seconds in failovers)
            + f"; duplicate Jobs: {duplicates}"
        )
    else:
        print(f"duplicate Jobs: {duplicates}")
    print(f"p95_ms {percentile(latencies, 0.95):.0f} requests_per_transition {total / transitions:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs submitted at once (default 50)")
    parser.add_argument(
        "--stages", type=int, default=4, help=f"stages per run, 2 to {MAX_STAGES} (default 4)"
    )
    parser.add_argument("--nodes", type=int, default=100, help="kwok nodes (default 100)")
    parser.add_argument("--replicas", type=int, default=1, help="operator processes (default 1)")
    parser.add_argument("--kill-leader", type=int, default=0, metavar="K", help="SIGKILL the leader K times")
    parser.add_argument("--pod-seconds", type=float, default=2.0, help="how long kwok keeps each pod running")
    parser.add_argument("--stock", action="store_true", help="the upstream control-plane limits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not 2 <= args.stages <= MAX_STAGES:
        parser.error(f"--stages must be between 2 and {MAX_STAGES}")
    if args.kill_leader and args.replicas < 2:
        parser.error("--kill-leader needs --replicas 2 or more")
    with tempfile.TemporaryDirectory(prefix="kubealign-bench-") as state:
        up_args = [
            "up",
            "--state-dir",
            state,
            "--nodes",
            str(args.nodes),
            *(["--stock"] if args.stock else []),
        ]
        print(
            f"control plane: tools/cluster {' '.join(up_args[3:])}, "
            f"profile {'stock' if args.stock else 'fast'}",
            flush=True,
        )
        up = subprocess.run(
            [sys.executable, str(CLUSTER_TOOL), *up_args], capture_output=True, text=True, check=False
        )
        if up.returncode != 0:
            raise SystemExit(f"tools/cluster up failed:\n{up.stderr}")
        try:
            measure(
                up.stdout.strip().splitlines()[-1],
                "kwok-kubealign",
                runs=args.runs,
                stages=args.stages,
                pod_seconds=args.pod_seconds,
                replicas=args.replicas,
                kill_leader=args.kill_leader,
                logs=Path(state),
            )
        finally:
            subprocess.run(
                [sys.executable, str(CLUSTER_TOOL), "down", "--state-dir", state],
                capture_output=True,
                check=False,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
