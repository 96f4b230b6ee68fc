#!/usr/bin/env python3
"""How fast the operator hands over from one stage to the next, and how many API requests it spends.

    .venv/bin/python tools/bench/operator_latency.py                # starts its own tools/cluster
    .venv/bin/python tools/bench/operator_latency.py --kubeconfig /tmp/c/kubeconfig --context kwok-kubealign

It installs the CRD, runs the operator in-process for a fresh namespace, and submits runs whose
stages form a chain (each stage reads the previous one's model), so every stage but the first
starts exactly when its predecessor's Job completes. kwok completes each pod after
``--pod-seconds``. A watch on the namespace's Jobs stamps, on this machine's monotonic clock, the
event in which stage N's Job reports Complete and the event in which stage N+1's Job appears; the
difference is the hand-over latency (watch delivery delays cancel out). API requests are the
operator's own (every request of kubealign.k8s, counted by verb and kind); kopf's watch streams
and its one annotation patch per spec change are not in them.

Prints p50/p95/max latency over all transitions and the requests per transition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from kubealign import api, render
from kubealign.handlers import serve
from kubealign.k8s import Kube

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_TOOL = REPO_ROOT / "tools" / "cluster"
MAX_STAGES = 32


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


def measure(kubeconfig: str, context: str, *, runs: int, stages: int, pod_seconds: float) -> None:
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
    kube = Kube.connect(kubeconfig=kubeconfig, context=context)
    # The benchmark's own polling goes through another client, so that it is not counted.
    observer = Kube.connect(kubeconfig=kubeconfig, context=context)
    stop, ready = threading.Event(), threading.Event()
    operator = threading.Thread(
        target=lambda: asyncio.run(
            serve(
                namespaces=[namespace],
                kubeconfig=kubeconfig,
                context=context,
                stop_flag=stop,
                ready_flag=ready,
                kube=kube,
            )
        ),
        daemon=True,
    )
    clock = JobClock(client, namespace)
    try:
        operator.start()
        if not ready.wait(60):
            raise SystemExit("the operator did not start within 60s")
        clock.start()
        before = Counter(kube.requests)
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
        for name in names:
            deadline = time.monotonic() + 60 + stages * (pod_seconds + 5)
            while (observer.get_run(namespace, name) or {}).get("status", {}).get("phase") != "Succeeded":
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"run {name} did not succeed in time: {observer.get_run(namespace, name)}"
                    )
                time.sleep(0.2)
        wall = time.monotonic() - started
        # Let the last status writes and events settle before reading the counters.
        time.sleep(1.0)
        spent = Counter(kube.requests) - before
    finally:
        clock.stop()
        stop.set()
        operator.join(30)
        kubectl(kubeconfig, context, "delete", "namespace", namespace, "--wait=false")

    latencies = []
    for name in names:
        for index in range(1, stages):
            done = clock.completed.get(render.job_name(name, f"s{index - 1}", 1))
            created = clock.created.get(render.job_name(name, f"s{index}", 1))
            if done is None or created is None:
                raise SystemExit(f"{name}: missing watch events around stage s{index}")
            latencies.append((created - done) * 1000)
    transitions = len(latencies)
    total = sum(spent.values())
    print(f"runs: {runs} x {stages} chained stages, pods run {pod_seconds}s, wall {wall:.1f}s")
    print(f"stage hand-over latency (Job Complete -> next Job created), {transitions} transitions:")
    print(
        f"  p50 {percentile(latencies, 0.5):.0f} ms   p95 {percentile(latencies, 0.95):.0f} ms   "
        f"max {max(latencies):.0f} ms   mean {statistics.fmean(latencies):.0f} ms"
    )
    per_stage = runs * stages
    print(
        f"operator API requests: {total} for {per_stage} stages = {total / per_stage:.1f} per stage "
        "transition"
    )
    for key, count in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {key:32s} {count:5d}  ({count / per_stage:.2f} per stage)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubeconfig", help="a throwaway cluster's kubeconfig (default: start tools/cluster)"
    )
    parser.add_argument("--context", default="kwok-kubealign")
    parser.add_argument("--runs", type=int, default=2, help="runs submitted at once (default 2)")
    parser.add_argument(
        "--stages", type=int, default=12, help=f"stages per run, at most {MAX_STAGES} (default 12)"
    )
    parser.add_argument("--pod-seconds", type=float, default=0.5, help="how long kwok keeps each pod running")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not 2 <= args.stages <= MAX_STAGES:
        parser.error(f"--stages must be between 2 and {MAX_STAGES}")
    if args.kubeconfig:
        measure(
            args.kubeconfig, args.context, runs=args.runs, stages=args.stages, pod_seconds=args.pod_seconds
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="kubealign-bench-") as state:
        up = subprocess.run(
            [sys.executable, str(CLUSTER_TOOL), "up", "--state-dir", state],
            capture_output=True,
            text=True,
            check=False,
        )
        if up.returncode != 0:
            raise SystemExit(f"tools/cluster up failed:\n{up.stderr}")
        try:
            measure(
                up.stdout.strip().splitlines()[-1],
                args.context,
                runs=args.runs,
                stages=args.stages,
                pod_seconds=args.pod_seconds,
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
