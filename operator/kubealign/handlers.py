"""The operator process: kopf's two watch streams feed the Reconciler, which does the work.

- every AlignmentRun event (created, changed, found at startup, deleted) and every event of a Job
  the operator made goes into the Reconciler's cache; the run it concerns is queued when something
  the planner reads changed (a Job event that only counts ready pods costs nothing);
- the Reconciler's worker pool reconciles queued runs, and its resync passes over the cache;
- with leader election, every replica watches (a standby's cache is warm) and only the Lease holder
  reconciles (kubealign.leader).

Handlers are registered on a fresh registry per operator, not kopf's global one, so several
operators (one per test namespace) can run in one process. They are event handlers only: kopf
keeps no per-object bookkeeping for them and never writes to a run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import kopf

from kubealign import api
from kubealign.k8s import Kube, load_configuration
from kubealign.leader import LeaderElector, LeaseSettings
from kubealign.metrics import OPERATOR_METRICS, OperatorMetrics
from kubealign.reconcile import DEFAULT_WORKERS, Reconciler
from kubealign.render import LABEL_MANAGED_BY, MANAGED_BY

DEFAULT_RESYNC_SECONDS: Final = 30.0
WATCH_RETRY_BACKOFFS: Final = (0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)

logger = logging.getLogger(__name__)


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
    # Leader election is ours (kubealign.leader), not kopf's peering; no CRD or namespace watching.
    settings.peering.standalone = True
    settings.scanning.disabled = True
    # We post our own Events; kopf's would only repeat them.
    settings.posting.enabled = False
    # A failed watch request is retried at least every 2 s, so that an API server back from an
    # outage is watched again within seconds (kopf's default Fibonacci backoff reaches 21 s; the
    # cost is one request per watch per 2 s while the server is away).
    settings.networking.error_backoffs = WATCH_RETRY_BACKOFFS
    # Only event handlers are registered (build_registry): kopf keeps no progress or diff-base
    # annotations for them, so it never PATCHes a run and needs no storage settings.
    return settings


def build_registry(*, kueue: bool = False) -> kopf.OperatorRegistry:
    """``kueue``: also watch Kueue's Workloads (the cluster must have Kueue's CRDs)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
        # Reloaded on every login so that rotated tokens and certificates are picked up.
        return connection_info(load_configuration(kubeconfig=memo.kubeconfig, context=memo.context))

    # Event handlers run on kopf's event loop and only touch memory (the cache and the work queue),
    # so no event ever waits for a thread, and the reconciles happen in the Reconciler's own pool.
    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def run_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        memo.reconciler.run_event(event["object"], deleted=event.get("type") == "DELETED")

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY}, registry=registry)
    async def job_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        memo.reconciler.job_event(event["object"], deleted=event.get("type") == "DELETED")

    @kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY}, registry=registry)
    async def pod_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        memo.reconciler.pod_event(event["object"], deleted=event.get("type") == "DELETED")

    if kueue:

        @kopf.on.event("kueue.x-k8s.io", "v1beta2", "workloads", registry=registry)
        async def workload_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
            memo.reconciler.workload_event(event["object"], deleted=event.get("type") == "DELETED")

    return registry


class LeadershipLostError(RuntimeError):
    """This replica lost the Lease and could not stop its reconciles in time; the process should exit
    and start over."""


def default_identity() -> str:
    """The pod name (or host) plus a random suffix: a restarted process is a new candidate."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{secrets.token_hex(4)}"


class Health:
    """``/readyz`` and ``/leader`` on a small HTTP server, for probes, Services and people.

    ``/readyz`` is 200 once the watches run, on the leader and on a standby alike: a standby is what
    makes a failover fast, and a PodDisruptionBudget counts only ready pods, so a standby that
    reported unready would make the leader's node impossible to drain. Which replica leads is in the
    body (``{"leader": true, ...}``), on ``/leader`` (200 on the leader, 503 on a standby), in the
    ``kubealign_operator_leader`` gauge and in the Lease's holderIdentity.
    """

    def __init__(
        self, address: str, *, ready: Callable[[], bool], leader: Callable[[], bool], identity: str
    ) -> None:
        host, _, port = address.rpartition(":")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state = {"ready": ready(), "leader": leader(), "identity": identity}
                ok = {"/readyz": state["ready"], "/leader": state["leader"]}.get(self.path.split("?")[0])
                code = 404 if ok is None else 200 if ok else 503
                payload = json.dumps(state).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds are not news

        self.server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.port = int(self.server.server_port)
        self._thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def _forward(stop_flag: asyncio.Event | threading.Event, target: asyncio.Event) -> None:
    if isinstance(stop_flag, asyncio.Event):
        await stop_flag.wait()
    else:
        while not stop_flag.is_set():
            await asyncio.sleep(0.1)
    target.set()


async def serve(
    *,
    namespaces: Sequence[str] = (),
    clusterwide: bool = False,
    kubeconfig: str | None = None,
    context: str | None = None,
    resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    workers: int = DEFAULT_WORKERS,
    leader_election: LeaseSettings | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    kube: Kube | None = None,
    liveness_endpoint: str | None = None,
    health_address: str | None = None,
    metrics: OperatorMetrics = OPERATOR_METRICS,
    kueue: bool = False,
) -> None:
    """Run the operator until ``stop_flag`` is set (or SIGINT/SIGTERM in the main thread).

    ``workers`` reconcile in parallel (the HTTP connection pool is sized to match). With
    ``leader_election`` the watches start at once but reconciling waits for the Lease; losing it
    (an API outage longer than the renew deadline) stops the reconciles and the replica campaigns
    again, or, if they do not stop in time, stops the operator with LeadershipLostError.
    ``liveness_endpoint`` (e.g. ``http://0.0.0.0:8080/healthz``) is kopf's health endpoint;
    ``health_address`` (e.g. ``0.0.0.0:8081``) serves ``/readyz`` and ``/leader`` (see Health).
    ``kueue`` watches Kueue's Workloads, so that a queued stage shows why Kueue holds it.
    """
    if clusterwide == bool(namespaces):
        raise ValueError("give either namespaces or clusterwide=True")
    # One connection per worker, plus the leader election's and a spare for pod reads at shutdown.
    kube = kube or Kube.connect(kubeconfig=kubeconfig, context=context, connections=workers + 2)
    kube.observer = lambda verb, resource: metrics.count_request(verb=verb, resource=resource)
    reconciler = Reconciler(kube, metrics=metrics)
    memo = kopf.Memo(reconciler=reconciler, kubeconfig=kubeconfig, context=context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    forwarding = asyncio.create_task(_forward(stop_flag, stop)) if stop_flag is not None else None
    watching = threading.Event()
    lost = threading.Event()
    elector_stop = threading.Event()
    identity = leader_election.identity if leader_election else default_identity()

    def lead() -> None:
        metrics.set_leader(True)
        reconciler.start(
            workers=workers,
            resync_seconds=resync_seconds,
            prime=[None] if clusterwide else list(namespaces),
        )

    def step_down() -> None:
        # Stop acting before another replica can take the Lease. Reconciles fail fast while the API
        # is unreachable, so they normally end well within the budget; one that does not (a request
        # hanging on a partitioned network) could race the next leader, so then the process exits.
        metrics.set_leader(False)
        budget = elector.stop_budget_seconds() if elector is not None else 0.0
        if reconciler.stop(timeout=budget):
            logger.warning("stopped reconciling; campaigning for the lease again")
            return
        logger.error("reconciles still running %.1fs after losing the lease; exiting", budget)
        lost.set()
        elector_stop.set()
        loop.call_soon_threadsafe(stop.set)

    elector = (
        LeaderElector(kube, leader_election, on_started=lead, on_stopped=step_down)
        if leader_election is not None
        else None
    )
    health = (
        Health(
            health_address,
            ready=lambda: watching.is_set() and not lost.is_set(),
            leader=lambda: elector.is_leader if elector is not None else watching.is_set(),
            identity=identity,
        )
        if health_address
        else None
    )
    if health is not None:
        health.start()
    campaign = threading.Thread(
        target=elector.run if elector is not None else lambda _stop: lead(),
        args=(elector_stop,),
        name="leader-election",
        daemon=True,
    )

    async def started() -> None:
        # kopf is up: its watches are listing. Campaign (or, alone, reconcile) from now on.
        await kopf_ready.wait()
        watching.set()
        if ready_flag is not None:
            ready_flag.set()
        campaign.start()

    kopf_ready = asyncio.Event()
    starter = asyncio.create_task(started())
    metrics.set_leader(False)
    try:
        await kopf.operator(
            registry=build_registry(kueue=kueue),
            settings=operator_settings(),
            standalone=True,
            clusterwide=clusterwide,
            namespaces=list(namespaces),
            stop_flag=stop,
            ready_flag=kopf_ready,
            memo=memo,
            liveness_endpoint=liveness_endpoint,
        )
    finally:
        starter.cancel()
        if forwarding is not None:
            forwarding.cancel()
        elector_stop.set()
        reconciler.stop()
        if campaign.is_alive():
            campaign.join(5)
        if elector is not None:
            elector.release()
        metrics.set_leader(False)
        if health is not None:
            health.stop()
    if lost.is_set():
        raise LeadershipLostError(f"{identity} stopped leading")
