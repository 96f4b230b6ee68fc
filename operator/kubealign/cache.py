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

    def sizes(self) -> tuple[int, int, int]:
        """(runs, Jobs, pods) held, for metrics and logs."""
        with self._lock:
            return (
                len(self._runs),
                sum(len(jobs) for jobs in self._jobs.values()),
                sum(len(pods) for pods in self._pods.values()),
            )
