"""A test-only kubelet: registers one Node and runs the pods scheduled to it as local processes.

The local control plane's other nodes are kwok's, which only pretend to run pods. This agent makes one
node real enough for an end-to-end run: a pod bound to it runs its container's command and args as a
process on this machine, with the env a kubelet would give it (literal values, ``$(VAR)`` expansion,
``valueFrom`` Secrets, ConfigMaps and the downward API including the Job completion index annotation,
``envFrom``), its volumes (ConfigMap and Secret keys materialised into a per-pod directory, emptyDirs as
temp dirs) and its working directory. Container paths are not chrooted: every path under a volume mount
(and the termination message path) is rewritten to the pod's directory wherever it appears in the
command, args, env values and workingDir, and the image's interpreters (``python``, ``torchrun``) map to
this checkout's venv, since images cannot run here.

Back through the API, like a kubelet: the Node with capacity (``nvidia.com/gpu`` included), a Ready
condition and a Lease in ``kube-node-lease`` renewed every few seconds; per pod, phase Running (podIP
127.0.0.1, container state running) then Succeeded or Failed with the exit code and the termination
message read from the file the process wrote (``KUBEALIGN_TERMINATION_LOG`` points there; with
``FallbackToLogsOnError`` the log tail stands in). A deleted pod's process gets SIGTERM, then SIGKILL
after its grace period, and the pod is then deleted with grace 0.

For failure tests, ``--preempt-stage NAME`` kills the first pod of that stage (label
``kubealign.io/stage``) as soon as its first checkpoint is published to S3, which is what a spot
preemption looks like to the trainer: SIGKILL mid-training, exit code 137.

kwok manages only nodes that carry its annotation, so it leaves this node alone. Pods see none of the
agent's own environment (in particular no S3 credentials): only what the pod spec gives them.

Run: ``python tests/e2e/node_agent.py --kubeconfig KUBECONFIG --node-name agent-0 --work-dir DIR``;
it prints ``node-agent ready <node>`` once the Node is registered, and deletes the Node on SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

LOG = logging.getLogger("node-agent")

AGENT_LABEL = "kubealign.io/node-agent"
STAGE_LABEL = "kubealign.io/stage"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 5.0
TERMINATION_MESSAGE_LIMIT = 4096
# What a kubelet falls back to with FallbackToLogsOnError: the tail of the log, bounded.
LOG_FALLBACK_LINES = 80
LOG_FALLBACK_BYTES = 2048
# The image's interpreters, resolved against this checkout's venv instead.
VENV_EXECUTABLES = ("python", "python3", "torchrun", "accelerate", "kubealign")


class PodSpecError(ValueError):
    """The pod asks for something this agent cannot provide; the message names the field."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------
# Pure pieces: path mapping, env resolution, $(VAR) expansion, termination messages. Unit-tested directly.


@dataclass(frozen=True)
class PathMap:
    """Container path prefixes -> host paths; the longest prefix wins, as with nested mounts."""

    mounts: tuple[tuple[str, str], ...] = ()

    def with_mount(self, container_path: str, host_path: str) -> PathMap:
        mounts = {**dict(self.mounts), container_path.rstrip("/") or "/": host_path}
        return PathMap(tuple(sorted(mounts.items(), key=lambda item: len(item[0]), reverse=True)))

    def host(self, path: str) -> str | None:
        for container_path, host_path in self.mounts:
            if path == container_path:
                return host_path
            if path.startswith(container_path + "/"):
                return host_path + path[len(container_path) :]
        return None

    def rewrite(self, text: str) -> str:
        """Rewrite a whole value that is a mapped path, or ``--flag=/mapped/path`` style values."""
        mapped = self.host(text)
        if mapped is not None:
            return mapped
        flag, sep, value = text.partition("=")
        if sep and flag.startswith("-"):
            mapped = self.host(value)
            if mapped is not None:
                return f"{flag}={mapped}"
        return text


_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names substitute, unknown stay verbatim, ``$$`` escapes."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REFERENCE.sub(substitute, text)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def field_value(pod: Mapping[str, Any], field_path: str) -> str:
    """The downward API's fieldRef values (the ones a kubelet supports)."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if field_path in simple:
        return str(simple[field_path] or "")
    subscript = _SUBSCRIPT.match(field_path)
    if subscript:
        return str((metadata.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise PodSpecError(f"fieldRef.fieldPath: {field_path!r} is not supported by the downward API")


def _quantity(value: str) -> float:
    """A resource quantity as a float (cores, bytes or a count)."""
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2.0**10,
        "Mi": 2.0**20,
        "Gi": 2.0**30,
        "Ti": 2.0**40,
    }
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value).strip())
    if match is None or match.group(2) not in ("", *suffixes):
        raise PodSpecError(f"resource quantity {value!r} is not understood")
    return float(match.group(1)) * suffixes.get(match.group(2), 1.0)


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """resourceFieldRef: like the kubelet, rounds up to the divisor and defaults limits to requests."""
    kind, _, name = str(ref.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or not name:
        raise PodSpecError(
            f"resourceFieldRef.resource: {ref.get('resource')!r} is not limits.X or requests.X"
        )
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name) or (resources.get("requests") or {}).get(name)
    if raw is None:
        raise PodSpecError(
            f"resourceFieldRef.resource: {ref.get('resource')!r}: the container sets no {name}"
        )
    divisor = _quantity(str(ref.get("divisor") or "1"))
    return str(math.ceil(_quantity(str(raw)) / divisor))


# (namespace, name) -> the object's data, or None when it does not exist.
Lookup = Callable[[str, str], Mapping[str, str] | None]


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    base: Mapping[str, str],
    secret: Lookup,
    config_map: Lookup,
) -> dict[str, str]:
    """The container's environment, in the kubelet's order: base, envFrom, then env with $(VAR) expansion.

    ``secret``/``config_map`` return an object's (decoded) data; a missing object or key is an error
    unless the reference is ``optional``.
    """
    namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
    env = dict(base)
    for index, source in enumerate(container.get("envFrom") or []):
        prefix = str(source.get("prefix") or "")
        for kind, lookup_all in (("secretRef", secret), ("configMapRef", config_map)):
            ref = source.get(kind)
            if ref is None:
                continue
            values = lookup_all(namespace, str(ref.get("name")))
            if values is None and not ref.get("optional"):
                raise PodSpecError(f"envFrom[{index}].{kind}: {ref.get('name')!r} not found")
            env.update({prefix + key: value for key, value in (values or {}).items()})
    for index, var in enumerate(container.get("env") or []):
        name = str(var.get("name"))
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        try:
            value = _value_from(pod, container, var["valueFrom"] or {}, secret=secret, config_map=config_map)
        except PodSpecError as exc:
            raise PodSpecError(f"env[{index}] ({name}).valueFrom.{exc}") from None
        if value is not None:
            env[name] = value
    return env


def _value_from(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    source: Mapping[str, Any],
    *,
    secret: Lookup,
    config_map: Lookup,
) -> str | None:
    """One env var's valueFrom; None for an optional reference that is missing."""
    if "fieldRef" in source:
        return field_value(pod, str(source["fieldRef"].get("fieldPath")))
    if "resourceFieldRef" in source:
        return resource_value(container, source["resourceFieldRef"])
    for kind, lookup in (("secretKeyRef", secret), ("configMapKeyRef", config_map)):
        if kind in source:
            ref = source[kind]
            namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
            value = (lookup(namespace, str(ref.get("name"))) or {}).get(str(ref.get("key")))
            if value is None and not ref.get("optional"):
                raise PodSpecError(f"{kind}: {ref.get('name')}/{ref.get('key')} not found")
            return value
    raise PodSpecError(f"{sorted(source)}: unsupported source")


def termination_message(*, message_file: Path, log_file: Path, exit_code: int, policy: str | None) -> str:
    """What the kubelet reports as ``terminated.message``: the file, else the log tail on error."""
    message = ""
    if message_file.is_file():
        message = message_file.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", "replace")
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError" and log_file.is_file():
        lines = log_file.read_bytes().decode("utf-8", "replace").splitlines()[-LOG_FALLBACK_LINES:]
        message = "\n".join(lines)[-LOG_FALLBACK_BYTES:]
    return message


def map_command(argv: list[str], *, venv_bin: Path) -> list[str]:
    """Swap the image's interpreter for this checkout's venv, keeping everything after it."""
    if not argv:
        raise PodSpecError("containers[0].command: empty (the agent cannot read an image's ENTRYPOINT)")
    program = os.path.basename(argv[0])
    if program in VENV_EXECUTABLES or re.fullmatch(r"python3(\.\d+)?", program):
        local = venv_bin / ("python" if program.startswith("python") else program)
        if not local.exists():
            raise PodSpecError(f"containers[0].command[0]: {argv[0]!r} maps to {local}, which does not exist")
        return [str(local), *argv[1:]]
    return argv


# ---------------------------------------------------------------------------------------------------------
# The agent: Node registration and heartbeats, the pod watch, one worker thread per pod.


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    work_dir: Path
    venv_bin: Path
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[tuple[str, str, str], ...] = ()
    gpus: int = 4
    cpu: str = "16"
    memory: str = "64Gi"
    preempt_stages: frozenset[str] = frozenset()


def node_manifest(settings: AgentSettings) -> dict[str, Any]:
    capacity = {
        "cpu": settings.cpu,
        "memory": settings.memory,
        "pods": "110",
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": str(settings.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": settings.node_name,
            "labels": {
                "kubernetes.io/hostname": settings.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "node-agent",
                AGENT_LABEL: "true",
                **settings.labels,
            },
        },
        "spec": {"taints": [{"key": k, "value": v, "effect": e} for k, v, e in settings.taints]},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": settings.node_name},
            ],
            "conditions": _node_conditions(),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v0.0.0-kubealign-node-agent",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "kubealign-node-agent://0.1",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def _node_conditions() -> list[dict[str, str]]:
    stamp = now()
    healthy = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    return [
        {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": "kubealign node agent",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        for kind, status, reason in healthy
    ]


class NodeAgent:
    """Registers the Node, keeps it alive, and runs every pod bound to it."""

    def __init__(self, api_client: client.ApiClient, settings: AgentSettings) -> None:
        self.settings = settings
        # Typed as Any: the client takes plain-dict bodies (the manifests below) though its stubs
        # name model classes, and dicts keep the objects readable as the YAML they are.
        self.core: Any = client.CoreV1Api(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.stop = threading.Event()
        self._workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._preempted: set[str] = set()

    # -- node ------------------------------------------------------------------------------------------

    def register(self) -> None:
        manifest = node_manifest(self.settings)
        try:
            self.core.create_node(manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.delete_node(self.settings.node_name, grace_period_seconds=0)
            self._wait_node_gone()
            self.core.create_node(manifest)
        self._renew_lease()

    def _wait_node_gone(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.core.read_node(self.settings.node_name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            time.sleep(0.2)
        raise TimeoutError(f"node {self.settings.node_name} still exists 30s after deletion")

    def _renew_lease(self) -> None:
        name = self.settings.node_name
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": stamp},
        }
        try:
            self.coordination.patch_namespaced_lease(name, LEASE_NAMESPACE, {"spec": body["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, body)

    def _heartbeat(self) -> None:
        beats = 0
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self._renew_lease()
                beats += 1
                # The node controller trusts the Lease; the status heartbeat is the slower, fuller one.
                if beats % 6 == 0:
                    self.core.patch_node_status(
                        self.settings.node_name, {"status": {"conditions": _node_conditions()}}
                    )
            except ApiException as exc:
                LOG.warning("heartbeat failed: %s %s", exc.status, exc.reason)

    def unregister(self) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_node(self.settings.node_name)
        with contextlib.suppress(ApiException):
            self.coordination.delete_namespaced_lease(self.settings.node_name, LEASE_NAMESPACE)

    # -- pods ------------------------------------------------------------------------------------------

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        selector = f"spec.nodeName={self.settings.node_name}"
        resource_version = ""
        while not self.stop.is_set():
            try:
                if not resource_version:
                    listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                    pods = [self.core.api_client.sanitize_for_serialization(pod) for pod in listing.items]
                    for pod in pods:
                        self._on_pod("ADDED", pod)
                    self._forget_missing({str(pod["metadata"]["uid"]) for pod in pods})
                    resource_version = listing.metadata.resource_version
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=resource_version,
                    timeout_seconds=30,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    obj = self.core.api_client.sanitize_for_serialization(event["object"])
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["type"], obj)
                    if self.stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:
                    resource_version = ""
                    continue
                LOG.warning("pod watch failed: %s %s; relisting", exc.status, exc.reason)
                resource_version = ""
                time.sleep(1)
            except (OSError, ValueError) as exc:
                # Connection resets and truncated chunks end a watch; a relist recovers the state.
                LOG.warning("pod watch interrupted: %s; relisting", exc)
                resource_version = ""
                time.sleep(1)

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        uid = str(pod["metadata"]["uid"])
        with self._lock:
            worker = self._workers.get(uid)
            if worker is None:
                # Pods that ended before this agent started are history (the API server deletes
                # terminal pods without a grace period, so none waits on us).
                if event == "DELETED" or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return
                worker = PodWorker(self, pod)
                self._workers[uid] = worker
                worker.start()
        if event == "DELETED":
            worker.kill(grace_seconds=0, delete=False)
        elif pod["metadata"].get("deletionTimestamp"):
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            worker.kill(grace_seconds=30 if grace is None else int(grace), delete=True)

    def _forget_missing(self, present: set[str]) -> None:
        """After a relist: pods deleted while the watch was down get no DELETED event; stop them now."""
        with self._lock:
            gone = [worker for uid, worker in self._workers.items() if uid not in present]
        for worker in gone:
            worker.kill(grace_seconds=0, delete=False)

    def claim_preemption(self, pod: Mapping[str, Any]) -> str | None:
        """The stage to preempt in this pod, once per stage for the agent's lifetime."""
        stage = ((pod.get("metadata") or {}).get("labels") or {}).get(STAGE_LABEL)
        with self._lock:
            if stage in self.settings.preempt_stages and stage not in self._preempted:
                self._preempted.add(stage)
                return str(stage)
        return None

    def shutdown(self) -> None:
        self.stop.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.kill(grace_seconds=0, delete=False)
        for worker in workers:
            worker.join(timeout=10)


class PodWorker(threading.Thread):
    """Runs one pod's container as a process and reports it through the pod's status."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.core: Any = agent.core
        self.pod = pod
        self.namespace = str(meta["namespace"])
        self.pod_name = str(meta["name"])
        self.uid = str(meta["uid"])
        self.root = agent.settings.work_dir / f"{self.namespace}_{self.pod_name}_{self.uid[:8]}"
        self.process: subprocess.Popen[bytes] | None = None
        self._killed = threading.Event()
        self._kill_lock = threading.Lock()
        self._delete_after_exit = False
        self._finished = False
        self.argv: list[str] = []

    # -- lookups for env and volumes -----------------------------------------------------------------

    def _secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        try:
            data = self.core.read_namespaced_secret(name, namespace).data or {}
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def _config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _materialise_volumes(self, container: Mapping[str, Any]) -> PathMap:
        """Write every volume's files under the pod's directory; map each mount path to its volume."""
        sources: dict[str, Path] = {}
        for index, volume in enumerate(self.pod["spec"].get("volumes") or []):
            name = str(volume["name"])
            target = self.root / "volumes" / name
            target.mkdir(parents=True, exist_ok=True)
            where = f"spec.volumes[{index}] ({name})"
            if "emptyDir" in volume:
                pass
            elif "configMap" in volume or "secret" in volume or "downwardAPI" in volume:
                self._write_source(target, volume, where)
            elif "projected" in volume:
                for number, source in enumerate((volume["projected"] or {}).get("sources") or []):
                    self._write_source(target, source, f"{where}.projected.sources[{number}]")
            else:
                supported = "emptyDir, configMap, secret, downwardAPI and projected"
                raise PodSpecError(f"{where}: only {supported} volumes are supported")
            sources[name] = target
        paths = PathMap()
        for index, mount in enumerate(container.get("volumeMounts") or []):
            source = sources.get(str(mount["name"]))
            if source is None:
                raise PodSpecError(f"containers[0].volumeMounts[{index}]: no volume named {mount['name']!r}")
            sub_path = str(mount.get("subPath") or "")
            paths = paths.with_mount(
                str(mount["mountPath"]), str(source / sub_path) if sub_path else str(source)
            )
        return paths

    def _write_source(self, target: Path, source: Mapping[str, Any], where: str) -> None:
        """One volume source (or projected source): its keys become files, as the kubelet writes them."""
        files: dict[str, str] = {}
        if "serviceAccountToken" in source:
            # Like the kubelet: a token bound to this pod, from the TokenRequest API.
            spec = source["serviceAccountToken"]
            request = self.core.create_namespaced_service_account_token(
                self.pod["spec"].get("serviceAccountName") or "default",
                self.namespace,
                {
                    "spec": {
                        "audiences": [spec["audience"]] if spec.get("audience") else None,
                        "expirationSeconds": int(spec.get("expirationSeconds") or 3600),
                        "boundObjectRef": {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": self.pod_name,
                            "uid": self.uid,
                        },
                    }
                },
            )
            files[str(spec["path"])] = request.status.token
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" not in item:
                    raise PodSpecError(f"{where}.downwardAPI.items: only fieldRef items are supported")
                try:
                    files[str(item["path"])] = field_value(self.pod, str(item["fieldRef"].get("fieldPath")))
                except PodSpecError as exc:
                    raise PodSpecError(f"{where}.downwardAPI.items.{exc}") from None
        else:
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind]
            # A volume names its Secret with secretName, a projected source with name.
            ref_name = str(ref.get("name") or ref.get("secretName"))
            data = (self._config_map if kind == "configMap" else self._secret)(self.namespace, ref_name)
            if data is None:
                if ref.get("optional"):
                    return
                raise PodSpecError(f"{where}.{kind}: {ref_name!r} not found")
            for item in ref.get("items") or [{"key": key, "path": key} for key in data]:
                if item["key"] not in data:
                    raise PodSpecError(f"{where}.{kind}.items: key {item['key']!r} not in {ref_name!r}")
                files[str(item["path"])] = data[item["key"]]
        for relative, content in files.items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)

    # -- the lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # The pod must end in a phase whatever went wrong, as with a kubelet.
            LOG.exception("pod %s/%s failed in the agent", self.namespace, self.pod_name)
            self._report_terminated(
                exit_code=128, reason="NodeAgentError", message=str(exc)[:1024], started=now()
            )
        with self._kill_lock:
            self._finished = True
            delete = self._delete_after_exit
        if delete:
            self._delete_pod()

    def _run(self) -> None:
        spec = self.pod["spec"]
        containers = spec.get("containers") or []
        if spec.get("initContainers") or len(containers) != 1:
            raise PodSpecError("spec: the node agent runs exactly one container and no initContainers")
        container = containers[0]
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = self.root / "scratch"
        scratch.mkdir(exist_ok=True)
        message_file = self.root / "termination-log"
        log_file = self.root / "container.log"
        try:
            paths = self._materialise_volumes(container)
            message_path = str(container.get("terminationMessagePath") or "/dev/termination-log")
            paths = paths.with_mount(message_path, str(message_file))
            base = {
                "PATH": f"{self.agent.settings.venv_bin}:/usr/local/bin:/usr/bin:/bin",
                "HOME": str(scratch),
                "TMPDIR": str(scratch),
                "LANG": "C.UTF-8",
                "HOSTNAME": self.pod_name,
                "PYTHONUNBUFFERED": "1",
                "KUBEALIGN_TERMINATION_LOG": message_path,
            }
            env = resolve_env(
                self.pod, container, base=base, secret=self._secret, config_map=self._config_map
            )
            env = {name: paths.rewrite(value) for name, value in env.items()}
            argv = [
                expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])
            ]
            argv = map_command([paths.rewrite(part) for part in argv], venv_bin=self.agent.settings.venv_bin)
            self.argv = argv
            working_dir = container.get("workingDir")
            cwd = paths.host(str(working_dir)) if working_dir else str(scratch)
            if cwd is None:
                raise PodSpecError(f"containers[0].workingDir {working_dir!r} is not under a volume mount")
        except PodSpecError as exc:
            self._report_terminated(
                exit_code=128, reason="CreateContainerConfigError", message=str(exc), started=now()
            )
            return
        restart_policy = str(spec.get("restartPolicy") or "Always")
        restarts = 0
        while True:
            started = now()
            with self._kill_lock:
                if self._killed.is_set():
                    return
                with log_file.open("ab") as log:
                    self.process = subprocess.Popen(
                        argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
            LOG.info("pod %s/%s: started pid %d: %s", self.namespace, self.pod_name, self.process.pid, argv)
            self._report_running(started=started, restarts=restarts)
            preempt = self.agent.claim_preemption(self.pod) if restarts == 0 else None
            if preempt is not None:
                threading.Thread(target=self._preempt_after_checkpoint, args=(env,), daemon=True).start()
            returncode = self.process.wait()
            exit_code = returncode if returncode >= 0 else 128 - returncode
            message = termination_message(
                message_file=message_file,
                log_file=log_file,
                exit_code=exit_code,
                policy=container.get("terminationMessagePolicy"),
            )
            LOG.info("pod %s/%s: exited %d", self.namespace, self.pod_name, exit_code)
            retry = (restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)) and (
                not self._killed.is_set()
            )
            if not retry:
                self._report_terminated(
                    exit_code=exit_code,
                    reason="Completed" if exit_code == 0 else "Error",
                    message=message,
                    started=started,
                    restarts=restarts,
                )
                return
            restarts += 1

    def kill(self, *, grace_seconds: int, delete: bool) -> None:
        """Stop the pod's process (SIGTERM, SIGKILL after the grace period); with ``delete``, then let the
        API server drop the pod, as a kubelet does once a deleted pod's containers are gone."""
        with self._kill_lock:
            already = self._killed.is_set()
            self._killed.set()
            self._delete_after_exit = self._delete_after_exit or delete
            process, finished = self.process, self._finished
        if finished:
            if delete:
                self._delete_pod()
            return
        # Not started yet: _run sees the flag and never starts it; run() then deletes the pod.
        if already or process is None:
            return
        threading.Thread(target=self._terminate, args=(process, grace_seconds), daemon=True).start()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], grace_seconds: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)
        try:
            process.wait(timeout=max(grace_seconds, 0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def _preempt_after_checkpoint(self, env: Mapping[str, str]) -> None:
        """SIGKILL the process once its first checkpoint is published: a preemption mid-training."""
        import boto3

        from kubealign_jobs.config import MANIFEST_FILE, StageConfig

        config_path = _flag_value(self.argv, "--config")
        if config_path is None or not Path(config_path).is_file():
            LOG.warning("pod %s: no local --config file among the args; not preempting", self.pod_name)
            return
        stage = StageConfig.from_json(Path(config_path).read_text())
        bucket, _, prefix = stage.checkpoints.removeprefix("s3://").partition("/")
        s3 = boto3.client(
            "s3",
            endpoint_url=env.get("AWS_ENDPOINT_URL") or stage.storage.endpoint,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            region_name=env.get("AWS_DEFAULT_REGION") or stage.storage.region or "us-east-1",
        )
        process = self.process
        while process is not None and process.poll() is None:
            listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
            if any(obj["Key"].endswith("/" + MANIFEST_FILE) for obj in listing.get("Contents", [])):
                LOG.info("pod %s: checkpoint published; preempting (SIGKILL)", self.pod_name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    # -- status ---------------------------------------------------------------------------------------

    def _conditions(self, *, ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        stamp = now()
        state = "True" if ready else "False"
        return [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "Ready", "status": state, "reason": reason, "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": state, "reason": reason, "lastTransitionTime": stamp},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
        ]

    def _container_status(self, state: dict[str, Any], *, ready: bool, restarts: int) -> dict[str, Any]:
        container = self.pod["spec"]["containers"][0]
        pid = self.process.pid if self.process else 0
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"node-agent://{self.uid}-{pid}",
            "ready": ready,
            "started": ready,
            "restartCount": restarts,
            "state": state,
        }

    def _report_running(self, *, started: str, restarts: int) -> None:
        running = {"running": {"startedAt": started}}
        self._write_status(
            {
                "phase": "Running",
                "conditions": self._conditions(ready=True),
                "containerStatuses": [self._container_status(running, ready=True, restarts=restarts)],
            }
        )

    def _report_terminated(
        self, *, exit_code: int, reason: str, message: str, started: str, restarts: int = 0
    ) -> None:
        terminated: dict[str, Any] = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now(),
                "containerID": f"node-agent://{self.uid}-{self.process.pid if self.process else 0}",
            }
        }
        if message:
            terminated["terminated"]["message"] = message
        self._write_status(
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": self._conditions(ready=False, reason="PodCompleted"),
                "containerStatuses": [self._container_status(terminated, ready=False, restarts=restarts)],
            }
        )

    def _write_status(self, update: Mapping[str, Any]) -> None:
        """Read-modify-replace of pods/status: replaces the container state whole, as a kubelet does."""
        for _ in range(10):
            try:
                current = self.core.api_client.sanitize_for_serialization(
                    self.core.read_namespaced_pod_status(self.pod_name, self.namespace)
                )
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            if current["metadata"]["uid"] != self.uid:
                return
            status = dict(current.get("status") or {})
            status.update(
                {
                    "hostIP": "127.0.0.1",
                    "hostIPs": [{"ip": "127.0.0.1"}],
                    "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}],
                    "startTime": status.get("startTime") or now(),
                    "qosClass": status.get("qosClass") or "BestEffort",
                    **update,
                }
            )
            current["status"] = status
            try:
                self.core.replace_namespaced_pod_status(self.pod_name, self.namespace, current)
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise
        raise RuntimeError(f"pod {self.namespace}/{self.pod_name}: status write kept conflicting")

    def _delete_pod(self) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                self.pod_name,
                self.namespace,
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )


def _flag_value(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def _parse_taint(text: str) -> tuple[str, str, str]:
    match = re.fullmatch(r"([^=:]+)(?:=([^:]*))?:(NoSchedule|PreferNoSchedule|NoExecute)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"--taint {text!r}: expected KEY[=VALUE]:EFFECT")
    return match.group(1), match.group(2) or "", match.group(3)


def _parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--label {text!r}: expected KEY=VALUE")
    return key, value


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--work-dir", required=True, type=Path, help="per-pod directories go here")
    parser.add_argument("--venv-bin", type=Path, default=Path(sys.executable).parent)
    parser.add_argument("--label", action="append", type=_parse_label, default=[])
    parser.add_argument("--taint", action="append", type=_parse_taint, default=[])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument(
        "--preempt-stage", action="append", default=[], help="kill its first pod at checkpoint 1"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s node-agent %(levelname)s %(message)s", force=True
    )
    settings = AgentSettings(
        node_name=args.node_name,
        work_dir=args.work_dir.resolve(),
        venv_bin=args.venv_bin,
        labels=dict(args.label),
        taints=tuple(args.taint),
        gpus=args.gpus,
        preempt_stages=frozenset(args.preempt_stage),
    )
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    api_client = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    agent = NodeAgent(api_client, settings)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.register()
    print(f"node-agent ready {settings.node_name}", flush=True)
    watcher = threading.Thread(target=agent.run, name="pod-watch", daemon=True)
    watcher.start()
    agent.stop.wait()
    agent.shutdown()
    agent.unregister()
    return 0


if __name__ == "__main__":
    sys.exit(main())
