"""The only module that talks to the Kubernetes API (kopf's own watches aside).

A thin JSON-over-REST layer on the official client's connection handling (kubeconfig, in-cluster
service account, TLS): it sends and returns plain dicts, which is all the pure planner and renderers
need and avoids the client's slow model (de)serialisation. Creating an object that already exists
returns the existing object: names are deterministic, so a 409 means the work was done before.

Every request is counted in ``Kube.requests`` so that the benchmark can report API requests per
stage transition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import kubernetes
import urllib3

from kubealign import api

logger = logging.getLogger(__name__)

COMPONENT: Final = "kubealign-operator"
REQUEST_TIMEOUT_SECONDS: Final = 30.0

# kind -> (API prefix, plural) for what the operator creates.
_RESOURCES: Final[Mapping[str, tuple[str, str]]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    api.KIND: (f"/apis/{api.API_VERSION}", api.PLURAL),
}


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_configuration(*, kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A client Configuration: the given kubeconfig, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    return configuration


def _path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path; ``namespace`` None means every namespace (a cluster-wide list)."""
    prefix, plural = _RESOURCES[kind]
    path = f"{prefix}/{plural}" if namespace is None else f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name is not None:
        path += f"/{quote(name)}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class Kube:
    """Typed operations on the objects the operator reads and writes, over one ApiClient."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        # Called with (verb, resource) for every request, e.g. to count it in Prometheus metrics.
        self.observer: Callable[[str, str], None] | None = None

    @classmethod
    def connect(
        cls, *, kubeconfig: str | None = None, context: str | None = None, connections: int | None = None
    ) -> Kube:
        """``connections``: the HTTP connection pool's size; give it one per thread that sends requests,
        or urllib3 opens and discards extra connections whenever more threads are busy than it keeps."""
        configuration = load_configuration(kubeconfig=kubeconfig, context=context)
        if connections is not None:
            configuration.connection_pool_maxsize = connections
        return cls(kubernetes.client.ApiClient(configuration))

    @property
    def configuration(self) -> Any:
        return self._client.configuration

    def request_count(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def _request(
        self,
        method: str,
        kind: str,
        namespace: str | None,
        name: str | None = None,
        *,
        subresource: str | None = None,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        path = _path(kind, namespace, name, subresource)
        resource = f"{kind}{'/' + subresource if subresource else ''}"
        with self._lock:
            self.requests[f"{method} {resource}"] += 1
        if self.observer is not None:
            self.observer(method, resource)
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, post = self._client.param_serialize(
            method,
            path,
            query_params=list(query) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                method, url, headers, body, post, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
            data = response.read()
        except kubernetes.client.ApiException as exc:
            raise KubeError(exc.status or 0, str(exc.reason), str(exc.body or exc)) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            # The server was not reached (refused, reset, timed out, TLS): status 0, like client-go.
            cause = getattr(exc, "reason", None) or exc
            raise KubeError(0, "Unreachable", f"{type(cause).__name__}: {cause}") from exc
        if not 200 <= response.status < 300:
            message = data.decode(errors="replace") if data else ""
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                message = json.loads(message).get("message", message)
            raise KubeError(response.status, str(response.reason), message)
        return json.loads(data) if data else None

    # --- reads ----------------------------------------------------------------------------------

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The AlignmentRun, or None when it is gone."""
        try:
            run: dict[str, Any] = self._request("GET", api.KIND, namespace, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return run

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self._request("GET", kind, namespace, name)
        return obj

    def list(
        self, kind: str, namespace: str | None, *, selector: str = "", field_selector: str = ""
    ) -> list[dict[str, Any]]:
        """The objects of one namespace, or of all (``namespace`` None)."""
        query = [
            (key, value)
            for key, value in (("labelSelector", selector), ("fieldSelector", field_selector))
            if value
        ]
        body = self._request("GET", kind, namespace, query=query)
        items: list[dict[str, Any]] = body.get("items") or []
        return items

    # --- writes ---------------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj``; if it exists already, return the existing object instead."""
        kind = str(obj["kind"])
        namespace = str(obj["metadata"]["namespace"])
        try:
            created: dict[str, Any] = self._request("POST", kind, namespace, body=dict(obj))
        except KubeError as exc:
            if exc.status != 409:
                raise
            return self.get(kind, namespace, str(obj["metadata"]["name"]))
        return created

    def set_job_suspended(self, namespace: str, name: str, *, suspend: bool) -> dict[str, Any]:
        job: dict[str, Any] = self._request(
            "PATCH",
            "Job",
            namespace,
            name,
            body={"spec": {"suspend": suspend}},
            content_type="application/merge-patch+json",
        )
        return job

    def replace_run_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Write the whole status in one request (JSON patch ``add`` replaces or creates it); returns
        the run as stored."""
        run: dict[str, Any] = self._request(
            "PATCH",
            api.KIND,
            namespace,
            name,
            subresource="status",
            body=[{"op": "add", "path": "/status", "value": dict(status)}],
            content_type="application/json-patch+json",
        )
        return run

    # --- leases (leader election) -----------------------------------------------------------------

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = self._request("GET", "Lease", namespace, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return lease

    def create_lease(self, lease: Mapping[str, Any]) -> dict[str, Any]:
        """Create a Lease; unlike ``create``, a 409 is an error: someone else created it first."""
        created: dict[str, Any] = self._request(
            "POST", "Lease", str(lease["metadata"]["namespace"]), body=dict(lease)
        )
        return created

    def replace_lease(self, lease: Mapping[str, Any]) -> dict[str, Any]:
        """PUT a Lease; its metadata.resourceVersion makes this fail with 409 if it changed meanwhile."""
        meta = lease["metadata"]
        replaced: dict[str, Any] = self._request(
            "PUT", "Lease", str(meta["namespace"]), str(meta["name"]), body=dict(lease)
        )
        return replaced

    def post_event(
        self,
        run: Mapping[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
    ) -> None:
        """A core/v1 Event on the run (what ``kubectl describe alignmentrun`` shows). Best effort."""
        meta = run.get("metadata", {})
        namespace = str(meta.get("namespace") or "default")
        stamp = now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": f"{api.GROUP}/operator",
            "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._request("POST", "Event", namespace, body=event)
        except KubeError as exc:
            # An Event that cannot be posted must not stop the reconcile that produced it.
            logger.warning("could not post event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)
