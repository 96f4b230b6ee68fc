"""Helpers for the operator's integration tests: install the CRD, run the operator, poll state.

``OperatorThread`` runs the real operator (``kubealign.handlers.serve``: kopf plus the reconciler)
in a background thread of the test process, scoped to one namespace, and stops it through kopf's
stop flag. ``OperatorProcess`` runs ``kubealign operator`` as a subprocess, for tests that kill it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubealign import api, render
from kubealign.handlers import serve
from kubealign.k8s import Kube
from tests.processes import wait_until

if TYPE_CHECKING:
    from tests.conftest import Cluster

REPO_ROOT = Path(__file__).resolve().parents[2]


def install_crd(cluster: Cluster) -> None:
    """The CRD and the hyperparameter admission policy, as ``kubealign crd | kubectl apply -f -``."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=api.install_text())
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{api.CRD_NAME}", "--timeout=60s")
    # A new policy takes effect once the API server has compiled it: probe with a dry run.
    probe = json.dumps(_policy_probe())
    deadline = time.monotonic() + 60
    while True:
        result = cluster.kubectl(
            "create", "--dry-run=server", "-n", "default", "-f", "-", input=probe, check=False
        )
        if "ValidatingAdmissionPolicy" in result.stderr:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the hyperparameter policy did not take effect: {result.stderr}")
        time.sleep(0.5)


def _policy_probe() -> dict[str, Any]:
    """A run only the admission policy refuses: an unknown hyperparameter."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "policy-probe"},
        "spec": {
            "storage": {"uri": "s3://probe/runs"},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "inputs": {"model": {"uri": "s3://m00/base"}, "data": {"uri": "s3://d00/sft"}},
                    "hyperparameters": {"no_such_hyperparameter": 1},
                }
            ],
        },
    }


def submit(cluster: Cluster, namespace: str, body: Mapping[str, Any]) -> None:
    """Create a run the way a user would: kubectl with strict field validation."""
    doc = json.loads(json.dumps(body))
    doc["metadata"] = {k: v for k, v in doc["metadata"].items() if k in ("name", "labels", "annotations")}
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc))


class Reader:
    """Reads the objects a test checks, through the operator's own API layer."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    def run(self, name: str) -> dict[str, Any]:
        body = self.kube.get_run(self.namespace, name)
        assert body is not None, f"run {name} is gone"
        return body

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.run(name).get("status") or {}
        return status

    def stage(self, name: str, stage: str) -> dict[str, Any]:
        for entry in self.status(name).get("stages") or ():
            if entry["name"] == stage:
                found: dict[str, Any] = entry
                return found
        return {}

    def jobs(self, name: str) -> dict[str, dict[str, Any]]:
        jobs = self.kube.list("Job", self.namespace, selector=render.run_selector(name))
        return {job["metadata"]["name"]: job for job in jobs}

    def events(self, name: str) -> list[dict[str, Any]]:
        events = self.kube.list("Event", self.namespace, field_selector=f"involvedObject.name={name}")
        # Timestamps have one-second resolution: the order within a second is not known.
        result: list[dict[str, Any]] = sorted(events, key=lambda e: e["metadata"]["creationTimestamp"])
        return result

    def reasons(self, name: str) -> list[str]:
        return [event["reason"] for event in self.events(name)]

    def messages(self, name: str) -> list[str]:
        """Every note's message: a Normal Event carries all of one reconcile's, joined by "; "."""
        return [part for event in self.events(name) for part in event["message"].split("; ")]

    def wait_phase(self, name: str, phase: str, *, timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == phase:
                return status
            return None

        status: dict[str, Any] = wait_until(f"run {name} to reach {phase}", reached, timeout=timeout)
        return status


class OperatorThread:
    """The operator, in-process, serving one namespace until stopped."""

    def __init__(
        self, cluster: Cluster, namespace: str, *, kubeconfig: str | None = None, kueue: bool = False
    ) -> None:
        self.namespace = namespace
        self.kueue = kueue
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.context = None if kubeconfig else cluster.context
        self.kube = Kube.connect(kubeconfig=self.kubeconfig, context=self.context)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"operator-{namespace}", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(
                serve(
                    namespaces=[self.namespace],
                    kubeconfig=self.kubeconfig,
                    context=self.context,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                    kube=self.kube,
                    kueue=self.kueue,
                )
            )
        except BaseException as exc:  # reported by stop(); a thread cannot raise into the test
            self._error = exc

    def start(self) -> OperatorThread:
        self._thread.start()
        wait_until("the operator to start", lambda: self._ready.is_set() or self._error, timeout=30)
        assert self._error is None, f"operator failed to start: {self._error!r}"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "operator did not stop within 30s"
        assert self._error is None, f"operator crashed: {self._error!r}"


@contextmanager
def operator_thread(
    cluster: Cluster, namespace: str, *, kubeconfig: str | None = None, kueue: bool = False
) -> Iterator[OperatorThread]:
    running = OperatorThread(cluster, namespace, kubeconfig=kubeconfig, kueue=kueue).start()
    try:
        yield running
    finally:
        running.stop()


class OperatorProcess:
    """``kubealign operator`` as a subprocess, so that a test can SIGKILL it mid-run."""

    def __init__(self, cluster: Cluster, namespace: str, log: Path, *args: str) -> None:
        """``args``: more ``kubealign operator`` options, e.g. ``--leader-elect``."""
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubealign.cli",
                "operator",
                "--namespace",
                namespace,
                "--kubeconfig",
                cluster.kubeconfig,
                "--context",
                cluster.context,
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()
