"""What the operator knows of its runs, Jobs and pods, fed by watch streams and by its own writes.

kopf streams every AlignmentRun, and every Job and pod the operator made (one watch each); the
handlers put each object here (of a pod, only what the planner reads), and a reconcile reads the
run, its Jobs and their pods from here instead of a GET and two LISTs per pass. The operator's own
writes (a created Job, a patched status) go in as soon as the API server answers, so the next
reconcile sees them before their watch event arrives.

Ordering: a watch delivers one object's versions in order, but the operator's write can land here
before the watch delivers an older version of the same object. An older version never replaces a
newer one. resourceVersions are opaque strings in the API's contract; every server today (etcd
revisions) makes them decimal integers that grow with each write, and when either side is not one,
the later arrival wins, which is what a watch-only cache does anyway.

The cache never invents state: a reconcile that acts on a stale view is still safe, because every
name the operator creates is deterministic (a second create of the same attempt answers 409 and
returns the object that exists).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from kubealign import render

Key = tuple[str, str]  # (namespace, name)


def resource_version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


def is_older(candidate: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """True when ``candidate`` is plainly an older version of the object than ``current``."""
    new, old = resource_version(candidate), resource_version(current)
    return new.isdigit() and old.isdigit() and int(new) < int(old)


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


class Cache:
    """Runs by (namespace, name); Jobs by their run's (namespace, name), then by Job name. Thread-safe.

    Bodies are stored as given and handed out as they are: callers treat them as read-only (the
    reconciler copies before it changes anything, see InstallDefaults.apply).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Key, Mapping[str, Any]] = {}
        self._jobs: dict[Key, dict[str, Mapping[str, Any]]] = {}
        self._pods: dict[Key, dict[str, Mapping[str, Any]]] = {}
        # Kueue Workloads by (namespace, name of the Job that owns them): their conditions only.
        self._workloads: dict[Key, Mapping[str, Any]] = {}

    def put_run(self, body: Mapping[str, Any]) -> bool:
        """Store a run; False (and nothing stored) when it is older than the one held."""
        key = key_of(body)
        with self._lock:
            held = self._runs.get(key)
            if held is not None and is_older(body, held):
                return False
            self._runs[key] = body
            return True

    def delete_run(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)

    def retain(self, namespace: str | None, runs: set[Key], jobs: set[Key]) -> None:
        """Drop the runs and Jobs of ``namespace`` (None: every namespace) that a fresh LIST did not
        return: deleted while no watch was delivering (an API outage), so no DELETED event came."""
        with self._lock:
            for key in [key for key in self._runs if namespace in (None, key[0]) and key not in runs]:
                del self._runs[key]
            for run in [run for run in self._jobs if namespace in (None, run[0])]:
                held = self._jobs[run]
                for name in [name for name in held if (run[0], name) not in jobs]:
                    del held[name]
                if not held:
                    del self._jobs[run]

    def run(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._runs.get((namespace, name))

    def runs(self) -> list[Mapping[str, Any]]:
        with self._lock:
            return list(self._runs.values())

    @staticmethod
    def _run_of(body: Mapping[str, Any]) -> Key | None:
        meta = body.get("metadata") or {}
        run = (meta.get("labels") or {}).get(render.LABEL_RUN)
        return (str(meta.get("namespace") or "default"), str(run)) if run else None

    def _put(
        self,
        index: dict[Key, dict[str, Mapping[str, Any]]],
        body: Mapping[str, Any],
        stored: Mapping[str, Any],
    ) -> bool:
        """Store ``stored`` (``body`` or what is kept of it) under its run and name, unless older."""
        run = self._run_of(body)
        if run is None:
            return False
        name = str((body.get("metadata") or {}).get("name"))
        with self._lock:
            held = index.setdefault(run, {}).get(name)
            if held is not None and is_older(stored, held):
                return False
            index[run][name] = stored
            return True

    def _delete(self, index: dict[Key, dict[str, Mapping[str, Any]]], body: Mapping[str, Any]) -> None:
        run = self._run_of(body)
        if run is None:
            return
        with self._lock:
            objects = index.get(run, {})
            objects.pop(str((body.get("metadata") or {}).get("name")), None)
            if not objects:
                index.pop(run, None)

    def put_job(self, body: Mapping[str, Any]) -> bool:
        """Store a Job of one of the operator's runs; False when it is older than the one held or
        carries no run label (nothing stored)."""
        return self._put(self._jobs, body, body)

    def delete_job(self, body: Mapping[str, Any]) -> None:
        self._delete(self._jobs, body)

    def jobs(self, namespace: str, run: str) -> dict[str, Mapping[str, Any]]:
        """The run's Jobs by name (a copy of the index; the bodies themselves are shared)."""
        with self._lock:
            return dict(self._jobs.get((namespace, run), {}))

    def put_pod(self, body: Mapping[str, Any]) -> bool:
        """Store what the planner reads of a trainer pod (labels, annotations, phase, container
        states: a finished Job's metrics and failure are in its pods' termination messages)."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        kept = {
            "metadata": {
                key: meta[key]
                for key in ("name", "namespace", "labels", "annotations", "resourceVersion")
                if key in meta
            },
            "status": {
                key: status[key]
                for key in ("phase", "reason", "message", "containerStatuses")
                if key in status
            },
        }
        return self._put(self._pods, body, kept)

    def delete_pod(self, body: Mapping[str, Any]) -> None:
        self._delete(self._pods, body)

    def pods(self, namespace: str, run: str) -> list[Mapping[str, Any]]:
        with self._lock:
            return list(self._pods.get((namespace, run), {}).values())

    @staticmethod
    def workload_job(body: Mapping[str, Any]) -> Key | None:
        """The (namespace, name) of the Job a Kueue Workload belongs to (its controller owner)."""
        meta = body.get("metadata") or {}
        for owner in meta.get("ownerReferences") or ():
            if owner.get("kind") == "Job" and owner.get("controller"):
                return str(meta.get("namespace") or "default"), str(owner.get("name"))
        return None

    def put_workload(self, body: Mapping[str, Any]) -> bool:
        """Store what the planner reads of a Workload (its conditions), keyed by its Job."""
        job = self.workload_job(body)
        if job is None:
            return False
        kept = {
            "metadata": {"resourceVersion": resource_version(body)},
            "status": {"conditions": list((body.get("status") or {}).get("conditions") or ())},
        }
        with self._lock:
            held = self._workloads.get(job)
            if held is not None and is_older(kept, held):
                return False
            self._workloads[job] = kept
            return True

    def delete_workload(self, body: Mapping[str, Any]) -> None:
        job = self.workload_job(body)
        if job is not None:
            with self._lock:
                self._workloads.pop(job, None)

    def workload(self, namespace: str, job: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._workloads.get((namespace, job))

    def run_of_job(self, namespace: str, job: str) -> str | None:
        """The run a cached Job belongs to (a Workload names only its Job)."""
        with self._lock:
            for (run_namespace, run), jobs in self._jobs.items():
                if run_namespace == namespace and job in jobs:
                    return run
        return None

    def sizes(self) -> tuple[int, int, int]:
        """(runs, Jobs, pods) held, for metrics and logs."""
        with self._lock:
            return (
                len(self._runs),
                sum(len(jobs) for jobs in self._jobs.values()),
                sum(len(pods) for pods in self._pods.values()),
            )
