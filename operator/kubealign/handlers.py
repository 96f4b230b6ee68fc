"""The kopf side of the operator: thin handlers that only ask the Reconciler to look at a run.

- an AlignmentRun is created, changed (spec, labels, annotations) or found at startup;
- a Job the operator made changes state: active, suspended, succeeded, failed, deleted (mapped to
  its run through the ``kubealign.io/run`` label; other Job updates cost nothing);
- a timer per run, as a safety net for anything missed (a failed request, a lost watch event).

Handlers are registered on a fresh registry per operator, not kopf's global one, so several
operators (one per test namespace) can run in one process. kopf runs the synchronous handlers in
its thread pool; the Reconciler serialises the work per run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any, Final

import kopf

from kubealign import api
from kubealign.k8s import Kube, load_configuration
from kubealign.reconcile import Reconciler
from kubealign.render import LABEL_MANAGED_BY, MANAGED_BY

DEFAULT_RESYNC_SECONDS: Final = 30.0


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from a kubernetes-client Configuration, so both use the same identity."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # One operator per scope; no peering objects, no CRD or namespace watching (less RBAC).
    settings.peering.standalone = True
    settings.scanning.disabled = True
    # We post our own Events; kopf's would only repeat them.
    settings.posting.enabled = False
    # kopf's bookkeeping goes to annotations under our group; status belongs to the operator.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.execution.max_workers = 8
    return settings


def build_registry(*, resync_seconds: float = DEFAULT_RESYNC_SECONDS) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
        # Reloaded on every login so that rotated tokens and certificates are picked up.
        return connection_info(load_configuration(kubeconfig=memo.kubeconfig, context=memo.context))

    @kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    @kopf.on.create(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    @kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    def run_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        memo.reconciler.request(namespace or "default", name)

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY}, registry=registry)
    def job_changed(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
        memo.reconciler.job_event(body, deleted=event.get("type") == "DELETED")

    # Succeeded and Failed runs need no safety net: only a spec change (on.update) or an event of
    # one of their Jobs can move them, and both are handled above.
    @kopf.timer(
        api.GROUP,
        api.VERSION,
        api.PLURAL,
        interval=resync_seconds,
        initial_delay=resync_seconds,
        when=lambda status, **_: status.get("phase") not in (api.RunPhase.SUCCEEDED, api.RunPhase.FAILED),
        registry=registry,
    )
    def resync(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        memo.reconciler.request(namespace or "default", name)

    return registry


async def serve(
    *,
    namespaces: Sequence[str] = (),
    clusterwide: bool = False,
    kubeconfig: str | None = None,
    context: str | None = None,
    resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    kube: Kube | None = None,
    liveness_endpoint: str | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or SIGINT/SIGTERM in the main thread).

    ``liveness_endpoint`` (e.g. ``http://0.0.0.0:8080/healthz``) is kopf's health endpoint for probes.
    """
    if clusterwide == bool(namespaces):
        raise ValueError("give either namespaces or clusterwide=True")
    kube = kube or Kube.connect(kubeconfig=kubeconfig, context=context)
    memo = kopf.Memo(reconciler=Reconciler(kube), kubeconfig=kubeconfig, context=context)
    await kopf.operator(
        registry=build_registry(resync_seconds=resync_seconds),
        settings=operator_settings(),
        standalone=True,
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=memo,
        liveness_endpoint=liveness_endpoint,
    )
