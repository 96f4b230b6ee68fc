"""A real local Kubernetes control plane for kubealign's tests, run by `tools/cluster`.

It builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm,
Kueue and Prometheus (for the monitoring tests) from source with plain `go build` (wrapper modules
in tools/go/, binaries cached outside the repo by version and build flags), then starts them on
free 127.0.0.1 ports with TLS, client-certificate auth, RBAC and service-account signing keys, and
lets kwok play the kubelet for N fake GPU nodes.

Standard library only: it has to run before the project's virtualenv exists.

Subcommands:
  build                      build the binaries, or find them cached
  up [--nodes N] [--gpus-per-node G] [--state-dir DIR] [--apiserver-port P] [--stock] [--kueue]
                             start the control plane (idempotent); last stdout line = kubeconfig.
                             The default profile is production-like: controller-manager and
                             scheduler at 400 QPS (burst 800), 50 concurrent Job syncs; --stock
                             keeps the upstream defaults (20/50 QPS, 5 Job syncs). --kueue also
                             starts Kueue (webhooks on 127.0.0.1, waitForPodsReady on) with a
                             ResourceFlavor, ClusterQueue kubealign-gpus (quota: the fake nodes'
                             cpu, memory and nvidia.com/gpu) and LocalQueue default in default
  down [--state-dir DIR]     stop what `up` started (by PID) and remove the state directory
  status [--state-dir DIR]   component, pid, alive, port, resident memory
  restart NAME [--down-seconds S] [--state-dir DIR]
                             stop one component (SIGTERM), keep it down S seconds (default 0), start
                             it again with the same flags and wait until it serves: an API server
                             restart or outage for clients to ride out
  kubeconfig [--state-dir DIR]  print the kubeconfig path of a running cluster
  which NAME                 print the cached path of a binary (kubectl, helm, ...)
  kubectl ARGS...            run the cached kubectl against the cluster

Environment:
  KUBEALIGN_CACHE_DIR   binaries and state live here (default ~/.cache/kubealign)
  KUBEALIGN_STATE_DIR   default state directory (default <cache>/state/<hash of this checkout>)

Fake node behaviour (kwok Stages that `up` installs; pod annotations):
  Pods scheduled onto a kwok node go Running at once.  A pod whose restartPolicy is Never or
  OnFailure (every Job pod) then ends Succeeded with exit code 0; restartPolicy Always pods
  (Deployments) keep running.
  kubealign.io/kwok-run-seconds: "2.5"     how long the pod stays Running first (default 1)
  kubealign.io/kwok-fail: "true"           the pod ends Failed instead (any restartPolicy; simulated
                                           as if it were Never), exit code 1
  kubealign.io/kwok-exit-code: "3"         exit code of a failing pod (1-255; anything else -> 1)
  kubealign.io/kwok-termination-message: '{"loss": 0.1}'
                                           becomes state.terminated.message of every container
  Deleting a pod ends it (Failed, exit code 143, unless already finished) and removes it once
  other controllers have dropped their finalizers, as a kubelet would.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent
GO_MODULES_DIR = REPO_ROOT / "tools" / "go"

CONTEXT_NAME = "kwok-kubealign"
STATE_FILE = "state.json"
# Written first into every state directory: `down` and stale clean-up delete only directories
# that carry it, so a mistyped --state-dir can never make us rm -rf someone else's files.
MARKER_FILE = ".kubealign-cluster"
STATE_VERSION = 1

# Kubernetes records a fixed build date so that rebuilding the same version is reproducible.
K8S_BUILD_DATE = "2026-01-01T00:00:00Z"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"

# The controllers a training operator exercises, plus what keeps a cluster coherent (service
# accounts, namespaces, node health). Listed explicitly: the full default set costs memory
# and CPU on a 2-core machine for controllers (volumes, HPA, ...) nothing here uses.
CONTROLLERS = (
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    "node-lifecycle-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "endpointslice-controller",
    "resourcequota-controller",
    "disruption-controller",
    "certificatesigningrequest-signing-controller",
    "certificatesigningrequest-approving-controller",
    "certificatesigningrequest-cleaner-controller",
)


class ClusterError(Exception):
    """A failure with a message meant for the person at the terminal, not a traceback."""


def log(message: str) -> None:
    """Progress goes to stderr so that stdout carries only results (the kubeconfig path)."""
    print(message, file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------
# Locations


def cache_dir() -> Path:
    override = os.environ.get("KUBEALIGN_CACHE_DIR")
    if override:
        return Path(override).expanduser().resolve()
    return Path.home() / ".cache" / "kubealign"


def default_state_dir() -> Path:
    override = os.environ.get("KUBEALIGN_STATE_DIR")
    if override:
        return Path(override).expanduser().resolve()
    # One cluster per checkout: two clones on one machine never share (or stop) each other's.
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]
    return cache_dir() / "state" / checkout


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Binary:
    """One executable built from a wrapper module under tools/go/."""

    name: str
    module_dir: str  # directory under tools/go/
    upstream: str  # the module whose version keys the cache directory
    package: str  # what `go build` builds, relative to the wrapper module

    def requirement(self, module: str) -> str:
        """The version of `module` that the wrapper module's go.mod pins."""
        go_mod = (GO_MODULES_DIR / self.module_dir / "go.mod").read_text()
        return go_mod_requirement(go_mod, module)

    def version(self) -> str:
        return self.requirement(self.upstream)

    def path(self, cache: Path | None = None) -> Path:
        root = cache if cache is not None else cache_dir()
        return root / "bin" / f"{self.module_dir}-{self.version()}" / self.name

    def ldflags(self) -> str:
        # -s -w strip symbol tables: the binaries are 30-40% smaller and nobody debugs them here.
        if self.module_dir == "kubernetes":
            return kubernetes_ldflags(self.version())
        if self.module_dir == "helm":
            return helm_ldflags(self.version(), client_go=self.requirement("k8s.io/client-go"))
        if self.module_dir == "kueue":
            stamps = {"GitVersion": self.version(), "BuildDate": K8S_BUILD_DATE}
            return "-s -w " + " ".join(f"-X sigs.k8s.io/kueue/pkg/version.{k}={v}" for k, v in stamps.items())
        return "-s -w"

    def build_flags(self) -> list[str]:
        """What `go build` is given besides `-o` and the package."""
        flags = ["-trimpath", "-ldflags", self.ldflags()]
        if self.module_dir == "prometheus":
            # Static scrape targets only: without the cloud service discoveries (AWS, Azure, GCE, ...)
            # the build takes a third of the time. The web UI's assets are not in the Go module;
            # the HTTP API, which the tests query, does not need them.
            flags += ["-tags", "remove_all_sd"]
        return flags

    def build_key(self) -> str:
        """A short hash of the build flags and package: the version alone does not say how it was built."""
        flags = json.dumps([*self.build_flags(), self.package])
        return hashlib.sha256(flags.encode()).hexdigest()[:12]

    def stamp_path(self, cache: Path | None = None) -> Path:
        """Beside the binary, the build_key it was built with (written once the binary is in place)."""
        binary = self.path(cache)
        return binary.with_name(f"{binary.name}.build-key")

    def current(self) -> bool:
        """Built, and with today's flags: changed flags (or a build from before stamps) rebuild once."""
        stamp = self.stamp_path()
        return self.path().is_file() and stamp.is_file() and stamp.read_text().strip() == self.build_key()


BINARIES = (
    Binary("kube-apiserver", "kubernetes", "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"),
    Binary(
        "kube-controller-manager",
        "kubernetes",
        "k8s.io/kubernetes",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    Binary("kube-scheduler", "kubernetes", "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"),
    Binary("kubectl", "kubernetes", "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kubectl"),
    Binary("etcd", "etcd", "go.etcd.io/etcd/server/v3", "."),
    Binary("kwok", "kwok", "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    Binary("helm", "helm", "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm"),
    Binary("kueue", "kueue", "sigs.k8s.io/kueue", "sigs.k8s.io/kueue/cmd/kueue"),
    # Not part of the cluster: tests/cluster/test_monitoring.py scrapes the operator with it.
    Binary(
        "prometheus",
        "prometheus",
        "github.com/prometheus/prometheus",
        "github.com/prometheus/prometheus/cmd/prometheus",
    ),
)
BINARY_BY_NAME = {binary.name: binary for binary in BINARIES}
KWOK_STAGE_CRD = "kwok.x-k8s.io_stages.yaml"


def go_mod_requirement(go_mod: str, module: str) -> str:
    """The version `go.mod` requires for `module`, in either `require x v` or block form."""
    pattern = re.compile(r"^\s*(?:require\s+)?" + re.escape(module) + r"\s+(v[^\s]+)", re.MULTILINE)
    match = pattern.search(go_mod)
    if match is None:
        raise ClusterError(f"go.mod does not require {module}")
    return match.group(1)


def go_mod_go_version(go_mod: str) -> tuple[int, ...]:
    """The `go 1.N[.P]` directive of a go.mod as a comparable tuple."""
    match = re.search(r"^go\s+(\d+(?:\.\d+)*)\s*$", go_mod, re.MULTILINE)
    if match is None:
        raise ClusterError("go.mod has no `go` directive")
    return tuple(int(part) for part in match.group(1).split("."))


def required_go_version() -> tuple[int, ...]:
    """The newest `go` directive among the wrapper modules: the toolchain must be at least this."""
    return max(go_mod_go_version((module / "go.mod").read_text()) for module in GO_MODULES_DIR.iterdir())


def parse_go_version(output: str) -> tuple[int, ...] | None:
    """`go version go1.26.8 linux/amd64` -> (1, 26, 8); None when the output is not recognised."""
    match = re.search(r"\bgo(\d+)\.(\d+)(?:\.(\d+))?", output)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups(default="0"))


def kubernetes_ldflags(version: str) -> str:
    """Stamp the real version so `kubectl version` and /version report it, as release builds do."""
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
    if match is None:
        raise ClusterError(f"unexpected Kubernetes version {version!r}")
    major, minor = match.groups()
    stamps = {
        "k8s.io/component-base/version.gitVersion": version,
        "k8s.io/component-base/version.gitMajor": major,
        "k8s.io/component-base/version.gitMinor": minor,
        "k8s.io/component-base/version.gitTreeState": "clean",
        "k8s.io/client-go/pkg/version.gitVersion": version,
        "k8s.io/client-go/pkg/version.gitMajor": major,
        "k8s.io/client-go/pkg/version.gitMinor": minor,
        "k8s.io/component-base/version.buildDate": K8S_BUILD_DATE,
    }
    return " ".join(["-s -w", *(f"-X {key}={value}" for key, value in stamps.items())])


def helm_kube_version(client_go: str) -> tuple[str, str]:
    """The Kubernetes (major, minor) that helm's Makefile derives from k8s.io/client-go: v0.N.x -> 1.N."""
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", client_go)
    if match is None:
        raise ClusterError(f"unexpected k8s.io/client-go version {client_go!r}")
    return str(int(match.group(1)) + 1), match.group(2)


def helm_ldflags(version: str, *, client_go: str) -> str:
    """What helm's Makefile stamps: its version (else `helm version` says only "v3.22"), and the
    Kubernetes version its client libraries speak, which offline `helm template` and `helm lint`
    assume (else v1.20, and a chart's `kubeVersion: >=1.30` fails without `--kube-version`)."""
    major, minor = helm_kube_version(client_go)
    stamps = {"helm.sh/helm/v3/internal/version.version": version}
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        stamps[f"{package}.k8sVersionMajor"] = major
        stamps[f"{package}.k8sVersionMinor"] = minor
    return " ".join(["-s -w", *(f"-X {key}={value}" for key, value in stamps.items())])


def check_go() -> str:
    """Return the go executable, or explain precisely what is wrong with the toolchain."""
    needed = ".".join(str(part) for part in required_go_version())
    go = shutil.which("go")
    if go is None:
        raise ClusterError(
            f"Go toolchain not found on PATH. Building the control plane needs Go >= {needed} "
            "(the wrapper modules in tools/go/ declare it); install it from https://go.dev/dl/ "
            "and put its bin/ directory on PATH."
        )
    result = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
    found = parse_go_version(result.stdout)
    if result.returncode != 0 or found is None:
        raise ClusterError(f"`{go} version` failed or was not understood: {result.stdout}{result.stderr}")
    if found < required_go_version():
        raise ClusterError(
            f"Go {needed} or newer is needed to build the control plane; found `{result.stdout.strip()}` "
            f"at {go}. Install a newer Go from https://go.dev/dl/."
        )
    return go


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never let go fetch a different toolchain behind our back: check_go() already said what's needed.
    env["GOTOOLCHAIN"] = "local"
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def build_binary(go: str, binary: Binary, index: int, total: int) -> None:
    target = binary.path()
    target.parent.mkdir(parents=True, exist_ok=True)
    logs = cache_dir() / "build-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{binary.name}-{binary.version()}.log"
    # Link to a temporary name and rename: an interrupted build never leaves a file that a later
    # run would mistake for a cached binary.
    partial = target.with_name(f".{binary.name}.partial-{os.getpid()}")
    command = [go, "build", *binary.build_flags(), "-o", str(partial), binary.package]
    log(f"[{index}/{total}] building {binary.name} {binary.version()} (log: {log_path})")
    started = time.monotonic()
    next_report = started + 30
    with log_path.open("w") as log_file:
        log_file.write(f"$ cd {GO_MODULES_DIR / binary.module_dir} && {' '.join(command)}\n")
        log_file.flush()
        process = subprocess.Popen(
            command,
            cwd=GO_MODULES_DIR / binary.module_dir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=go_env(),
        )
        try:
            while process.poll() is None:
                time.sleep(1)
                if time.monotonic() >= next_report:
                    log(f"      still building {binary.name}: {format_seconds(time.monotonic() - started)}")
                    next_report += 30
        except BaseException:
            process.kill()
            process.wait()
            partial.unlink(missing_ok=True)
            raise
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ClusterError(
            f"building {binary.name} failed (exit {process.returncode}) after {format_seconds(elapsed)}; "
            f"last lines of the go output (full log: {log_path}):\n{tail(log_path)}"
        )
    os.replace(partial, target)
    # After the binary: a crash in between leaves an old stamp, which only costs one more build.
    stamp = binary.stamp_path()
    partial_stamp = stamp.with_name(f".{stamp.name}.partial-{os.getpid()}")
    partial_stamp.write_text(f"{binary.build_key()}\n")
    os.replace(partial_stamp, stamp)
    size = target.stat().st_size / 2**20
    log(f"      built {binary.name} in {format_seconds(elapsed)} ({size:.1f} MiB)")


def kwok_stage_crd_path() -> Path:
    return BINARY_BY_NAME["kwok"].path().parent / "crd" / KWOK_STAGE_CRD


def kueue_manifests_dir() -> Path:
    """Kueue's CRDs (crd/) and webhook configurations (webhook.yaml), kept beside its binary."""
    return BINARY_BY_NAME["kueue"].path().parent / "manifests"


def module_source(go: str, binary: Binary) -> Path:
    """The module cache directory of the upstream module a binary is built from."""
    result = subprocess.run(
        [go, "mod", "download", "-json", f"{binary.upstream}@{binary.version()}"],
        cwd=GO_MODULES_DIR / binary.module_dir,
        capture_output=True,
        text=True,
        env=go_env(),
        check=False,
    )
    if result.returncode != 0:
        raise ClusterError(f"`go mod download {binary.upstream}` failed:\n{result.stdout}{result.stderr}")
    return Path(json.loads(result.stdout)["Dir"])


def fetch_manifests(go: str) -> None:
    """Keep the manifests `up` applies (kwok's Stage CRD, Kueue's CRDs and webhooks) beside the
    binaries, so that `up` never needs Go or the module cache."""
    if not kwok_stage_crd_path().is_file():
        source = module_source(go, BINARY_BY_NAME["kwok"]) / "kustomize" / "crd" / "bases" / KWOK_STAGE_CRD
        kwok_stage_crd_path().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, kwok_stage_crd_path())
    target = kueue_manifests_dir()
    if not (target / "webhook.yaml").is_file():
        components = module_source(go, BINARY_BY_NAME["kueue"]) / "config" / "components"
        partial = target.with_name(f".manifests.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "crd").mkdir(parents=True)
        for crd in sorted((components / "crd" / "bases").glob("*.yaml")):
            shutil.copyfile(crd, partial / "crd" / crd.name)
        shutil.copyfile(components / "webhook" / "manifests.yaml", partial / "webhook.yaml")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)


def manifests_fetched() -> bool:
    return kwok_stage_crd_path().is_file() and (kueue_manifests_dir() / "webhook.yaml").is_file()


def missing_binaries() -> list[Binary]:
    """Binaries not built at all; `up` runs with ones built with older flags until the next build."""
    return [binary for binary in BINARIES if not binary.path().is_file()]


def stale_binaries() -> list[Binary]:
    """Binaries that `build` (re)builds: missing, or built with other flags than today's."""
    return [binary for binary in BINARIES if not binary.current()]


def build() -> None:
    stale = stale_binaries()
    for binary in BINARIES:
        if binary not in stale:
            log(f"{binary.name} {binary.version()}: cached at {binary.path()}")
        elif binary.path().is_file():
            log(f"{binary.name} {binary.version()}: cached, but not built with today's flags; rebuilding")
    if not stale and manifests_fetched():
        log("all binaries cached; nothing to build")
        return
    go = check_go()
    if stale:
        log(
            f"building {len(stale)} binaries with {go} (a cold build takes tens of minutes "
            "on 2 cores; the go build cache makes later ones faster)"
        )
    started = time.monotonic()
    for index, binary in enumerate(stale, start=1):
        build_binary(go, binary, index, len(stale))
    fetch_manifests(go)
    log(f"build finished in {format_seconds(time.monotonic() - started)}")


def require_built(*, kueue: bool = False) -> None:
    """`up` needs every binary but helm (and kueue, unless asked for), and the manifests it applies."""
    optional = {"helm", "prometheus"} if kueue else {"helm", "prometheus", "kueue"}
    missing = [binary for binary in missing_binaries() if binary.name not in optional]
    if missing or not manifests_fetched():
        names = ", ".join(binary.name for binary in missing) or "the kwok and Kueue manifests"
        raise ClusterError(
            f"not built yet: {names} (cache: {cache_dir()}). Run `tools/cluster build` first; "
            "a cold build takes tens of minutes on 2 cores."
        )


def is_throwaway_context(name: str) -> bool:
    """Whether tests may use an existing cluster's context: only names that say it is disposable."""
    lowered = name.lower()
    return lowered.startswith(("kind-", "kwok-")) or "throwaway" in lowered or "test" in lowered


# ---------------------------------------------------------------------------------------------
# Ports and processes


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pick_free_ports(count: int) -> list[int]:
    """Distinct ports that are free on 127.0.0.1 right now (the kernel picks; we hold all at once)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def process_alive(pid: int, exe: str) -> bool:
    """True if `pid` runs and is still the program we started (PIDs get reused)."""
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = (proc / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3, after the parenthesised command name, is the state; Z is a zombie: exited.
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    try:
        running = os.readlink(proc / "exe").removesuffix(" (deleted)")
    except OSError:
        try:
            running = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode()
        except OSError:
            return False
    return os.path.realpath(running) == os.path.realpath(exe)


def resident_bytes(pid: int) -> int:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


@dataclass(frozen=True)
class Component:
    """One process `up` started."""

    name: str
    pid: int
    exe: str
    port: int | None
    log: str
    # How it was started, so that `restart` can start it again exactly so (same ports and files).
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    def alive(self) -> bool:
        return process_alive(self.pid, self.exe)

    @staticmethod
    def from_json(item: dict[str, Any]) -> Component:
        return Component(**{**item, "args": tuple(item.get("args") or ())})


@dataclass(frozen=True)
class ClusterState:
    """What `up` writes to <state dir>/state.json, and what `down`/`status` read back."""

    state_dir: str
    kubeconfig: str
    server: str
    nodes: int
    gpus_per_node: int
    components: tuple[Component, ...] = ()
    binaries: dict[str, str] = field(default_factory=dict)
    profile: str = "fast"

    def with_component(self, component: Component) -> ClusterState:
        return dataclasses.replace(self, components=(*self.components, component))

    def replacing(self, component: Component) -> ClusterState:
        """The state with the component of the same name swapped for ``component`` (in place)."""
        return dataclasses.replace(
            self,
            components=tuple(component if c.name == component.name else c for c in self.components),
        )

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        names = ", ".join(c.name for c in self.components)
        raise ClusterError(f"no component {name!r} in this cluster (it has {names})")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "state_dir": self.state_dir,
            "kubeconfig": self.kubeconfig,
            "context": CONTEXT_NAME,
            "server": self.server,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "components": [dataclasses.asdict(component) for component in self.components],
            "binaries": self.binaries,
            "profile": self.profile,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ClusterState:
        return ClusterState(
            state_dir=str(data["state_dir"]),
            kubeconfig=str(data["kubeconfig"]),
            server=str(data["server"]),
            nodes=int(data["nodes"]),
            gpus_per_node=int(data["gpus_per_node"]),
            components=tuple(Component.from_json(item) for item in data["components"]),
            binaries={str(key): str(value) for key, value in data.get("binaries", {}).items()},
            profile=str(data.get("profile", "stock")),
        )


def dead_components(state: ClusterState, alive: Callable[[Component], bool] = Component.alive) -> list[str]:
    """Names of the recorded components that no longer run (the state is stale if any)."""
    return [component.name for component in state.components if not alive(component)]


def load_state(state_dir: Path) -> ClusterState | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return ClusterState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise ClusterError(f"{path} is unreadable ({error}); remove {state_dir} by hand") from error


def save_state(state: ClusterState) -> None:
    path = Path(state.state_dir) / STATE_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(partial, path)


def stop_components(components: Sequence[Component], *, grace_seconds: float = 10.0) -> None:
    """Stop in reverse start order, each with SIGTERM and then SIGKILL after the grace period.

    One at a time: the API server shuts down cleanly only while etcd still answers.
    """
    for component in reversed(components):
        if not component.alive():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(component.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and component.alive():
            time.sleep(0.05)
        if component.alive():
            log(
                f"{component.name} (pid {component.pid}) ignored SIGTERM for {grace_seconds:.0f}s; killing it"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(component.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and component.alive():
                time.sleep(0.05)


def remove_state_dir(state_dir: Path) -> None:
    if not (state_dir / MARKER_FILE).exists():
        raise ClusterError(f"{state_dir} has no {MARKER_FILE} marker; refusing to delete it")
    shutil.rmtree(state_dir)


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state directory (the lock file lives beside it, so it survives down)."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir.parent / f".{state_dir.name}.lock"
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def new_key(pki: Path, name: str) -> None:
    # ECDSA P-256: keys generate in milliseconds, and every component here accepts them.
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=pki
    )


def issue_certificate(pki: Path, name: str, subject: str, extensions: str) -> None:
    """A leaf certificate for `name`.key signed by the local CA."""
    new_key(pki, name)
    (pki / f"{name}.ext").write_text(f"[v3]\n{extensions}\n")
    openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "0x" + secrets.token_hex(16), "-days", "365", "-sha256",
        "-extfile", f"{name}.ext", "-extensions", "v3", "-out", f"{name}.crt",
        cwd=pki,
    )  # fmt: skip


CLIENT_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth"
)


def make_pki(pki: Path) -> None:
    pki.mkdir(parents=True)
    new_key(pki, "ca")
    (pki / "ca.cnf").write_text(
        "[req]\ndistinguished_name=dn\nx509_extensions=v3\nprompt=no\n[dn]\nCN=kubealign-local-ca\n"
        "[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"
    )
    openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-config", "ca.cnf", "-days", "365", "-sha256",
        "-out", "ca.crt",
        cwd=pki,
    )  # fmt: skip
    serving_names = (
        "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
    )
    issue_certificate(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={serving_names}",
    )
    # The admin user is in system:masters, the group RBAC never restricts.
    issue_certificate(pki, "admin", "/O=system:masters/CN=kubealign-admin", CLIENT_EXTENSIONS)
    # The controller manager and scheduler use the identities the RBAC bootstrap policy expects.
    issue_certificate(pki, "controller-manager", "/CN=system:kube-controller-manager", CLIENT_EXTENSIONS)
    issue_certificate(pki, "scheduler", "/CN=system:kube-scheduler", CLIENT_EXTENSIONS)
    issue_certificate(pki, "kwok", "/O=system:masters/CN=kwok-controller", CLIENT_EXTENSIONS)
    new_key(pki, "sa")
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig_text(*, server: str, pki: Path, user: str) -> str:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    # Certificates are embedded so the file works on its own (helm, the Python client, copies).
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {b64('ca.crt')}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"    client-certificate-data: {b64(user + '.crt')}\n"
        f"    client-key-data: {b64(user + '.key')}\n"
        "contexts:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  context:\n"
        f"    cluster: {CONTEXT_NAME}\n"
        f"    user: {user}\n"
        f"current-context: {CONTEXT_NAME}\n"
    )


# ---------------------------------------------------------------------------------------------
# Talking to the API server (stdlib HTTPS with the admin client certificate)


class ApiClient:
    def __init__(self, server: str, pki: Path) -> None:
        self.server = server
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=timeout) as response:
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            payload = error.read()
            status = error.code
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def create(self, path: str, body: dict[str, Any]) -> None:
        status, reply = self.request("POST", path, body)
        # 409: it already exists, which is what we wanted.
        if status not in (200, 201, 202, 409):
            raise ClusterError(f"POST {path} -> HTTP {status}: {reply}")

    def ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/readyz", timeout=2)
        except (OSError, ssl.SSLError):
            return False
        return status == 200


def http_ok(url: str, *, insecure: bool = False) -> bool:
    """GET url -> 2xx. `insecure` for the self-signed health endpoints of the controllers."""
    context = None
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            code: int = response.status
    except (OSError, ssl.SSLError):
        return False
    return 200 <= code < 300


# ---------------------------------------------------------------------------------------------
# kwok: fake GPU nodes and the Stages that play the kubelet


def fake_node(index: int, *, gpus: int) -> dict[str, Any]:
    name = f"kwok-gpu-{index}"
    resources = {
        "cpu": "32",
        "memory": "256Gi",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            # Our kwok plays only nodes with this annotation (--manage-nodes-with-annotation-selector).
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "node.kubernetes.io/instance-type": "kwok-gpu",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.product": "kwok-fake-gpu",
            },
        },
        "spec": {},
        # The API server keeps the status of a created Node; kwok's node stage leaves capacity alone.
        "status": {"capacity": resources, "allocatable": resources},
    }


def jq(key: str, operator: str, *values: str) -> dict[str, Any]:
    requirement: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        requirement["values"] = list(values)
    return {"jq": requirement}


def stage(name: str, kind: str, selector: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "kubealign-tools-cluster"}},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": kind},
            "selector": {"matchExpressions": selector},
            **spec,
        },
    }


def status_patch(template: str) -> list[dict[str, Any]]:
    return [{"patch": {"subresource": "status", "root": "status", "template": template}}]


NOT_DELETED = jq(".metadata.deletionTimestamp", "DoesNotExist")
DELETED = jq(".metadata.deletionTimestamp", "Exists")
FAIL_ANNOTATION = '.metadata.annotations["kubealign.io/kwok-fail"]'
# How long a pod stays Running: the annotation is seconds; kwok wants a Go duration string.
RUN_DELAY = {
    "durationMilliseconds": 1000,
    "durationFrom": {
        "jq": {"expression": '(.metadata.annotations["kubealign.io/kwok-run-seconds"] // empty) + "s"'}
    },
}

NODE_HEARTBEAT_TEMPLATE = """\
{{ $now := Now }}
{{ $since := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $since | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
"""

# A Ready node: the heartbeat conditions plus the status kwok fills in once.
NODE_READY_TEMPLATE = (
    NODE_HEARTBEAT_TEMPLATE
    + """\
addresses:
- address: {{ NodeIP | Quote }}
  type: InternalIP
- address: {{ NodeName | Quote }}
  type: Hostname
nodeInfo:
  architecture: amd64
  containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
  kernelVersion: {{ printf "kwok-%s" Version | Quote }}
  kubeProxyVersion: {{ printf "kwok-%s" Version | Quote }}
  kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
  operatingSystem: linux
  bootID: ""
  machineID: ""
  osImage: ""
  systemUUID: ""
phase: Running
"""
)

POD_RUNNING_TEMPLATE = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
{{ with .spec.initContainers }}
initContainerStatuses:
{{ range . }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      reason: Completed
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
hostIPs:
- ip: {{ NodeIPWith .spec.nodeName | Quote }}
{{ $podIP := PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
podIP: {{ $podIP | Quote }}
podIPs:
- ip: {{ $podIP | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""


def pod_finished_template(*, phase: str, reason: str, exit_code: str) -> str:
    """Status of a pod whose containers all exited; `exit_code` is a template expression."""
    return (
        """\
{{ $now := Now }}
{{ $annotations := or .metadata.annotations dict }}
{{ $message := index $annotations "kubealign.io/kwok-termination-message" }}
{{ $rawCode := or ( index $annotations "kubealign.io/kwok-exit-code" ) "" }}
{{ $started := or .status.startTime $now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
"""
        + f"      exitCode: {exit_code}\n"
        + f"      reason: {reason}\n"
        + """\
      startedAt: {{ $started | Quote }}
      finishedAt: {{ $now | Quote }}
{{ with $message }}
      message: {{ . | Quote }}
{{ end }}
{{ end }}
"""
        + f"phase: {phase}\n"
    )


# A failing pod's exit code: the annotation when it is 1-255, else 1 (Failed with 0 would be a lie).
FAIL_EXIT_CODE = (
    '{{ if and ( regexMatch "^[0-9]{1,3}$" $rawCode ) ( lt 0 ( atoi $rawCode ) ) '
    "( lt ( atoi $rawCode ) 256 ) }}"
    "{{ atoi $rawCode }}{{ else }}1{{ end }}"
)


def kwok_stages() -> list[dict[str, Any]]:
    """The node and pod lifecycle kwok plays, adapted from kwok's kustomize/stage/{node,pod}/fast.

    Differences from upstream: pods complete by restartPolicy rather than by Job ownership, the
    kubealign.io/kwok-* annotations drive run time, failure, exit code and termination message,
    and a deleted pod first reaches a terminal phase (as a kubelet reports it) so the Job
    controller drops its tracking finalizer instead of the pod being stuck or counted wrongly.
    """
    node_not_ready = jq('.status.conditions.[] | select( .type == "Ready" ) | .status', "NotIn", "True")
    node_ready = jq('.status.conditions.[] | select( .type == "Ready" ) | .status', "In", "True")
    running = jq(".status.phase", "In", "Running")
    return [
        stage("kubealign-node-initialize", "Node", [node_not_ready], steps=status_patch(NODE_READY_TEMPLATE)),
        # Leases (kwok --node-lease-duration-seconds) keep nodes healthy; conditions are refreshed
        # every few minutes, as a kubelet does.
        stage(
            "kubealign-node-heartbeat",
            "Node",
            [jq(".status.phase", "In", "Running"), node_ready],
            delay={"durationMilliseconds": 240000, "jitterDurationMilliseconds": 300000},
            steps=status_patch(NODE_HEARTBEAT_TEMPLATE),
        ),
        stage(
            "kubealign-pod-running",
            "Pod",
            [
                NOT_DELETED,
                jq(".status.phase", "In", "Pending"),
                jq('.status.conditions.[] | select( .type == "Ready" ) | .status', "NotIn", "True"),
            ],
            steps=status_patch(POD_RUNNING_TEMPLATE),
        ),
        stage(
            "kubealign-pod-succeeded",
            "Pod",
            [
                NOT_DELETED,
                running,
                jq(".spec.restartPolicy", "In", "Never", "OnFailure"),
                jq(FAIL_ANNOTATION, "NotIn", "true"),
            ],
            delay=RUN_DELAY,
            steps=status_patch(pod_finished_template(phase="Succeeded", reason="Completed", exit_code="0")),
        ),
        stage(
            "kubealign-pod-failed",
            "Pod",
            [NOT_DELETED, running, jq(FAIL_ANNOTATION, "In", "true")],
            delay=RUN_DELAY,
            steps=status_patch(
                pod_finished_template(phase="Failed", reason="Error", exit_code=FAIL_EXIT_CODE)
            ),
        ),
        # A deleted pod that still runs gets SIGTERM from a kubelet and exits 143.
        stage(
            "kubealign-pod-terminated",
            "Pod",
            [DELETED, jq(".status.phase", "NotIn", "Succeeded", "Failed")],
            steps=status_patch(pod_finished_template(phase="Failed", reason="Error", exit_code="143")),
            immediateNextStage=True,
        ),
        # Then the kubelet's final delete (grace period 0); the object goes once finalizers are gone.
        stage(
            "kubealign-pod-delete",
            "Pod",
            [DELETED, jq(".status.phase", "In", "Succeeded", "Failed")],
            steps=[{"delete": True}],
        ),
    ]


# ---------------------------------------------------------------------------------------------
# up / down / status


def wait_for(
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    watch: Sequence[tuple[Component, subprocess.Popen[bytes]]] = (),
    interval: float = 0.2,
) -> None:
    """Poll `check`; fail fast (with its log) if one of the processes in `watch` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for component, process in watch:
            if process.poll() is not None:
                raise ClusterError(died_message(component, process.returncode))
        if check():
            return
        if time.monotonic() > deadline:
            logs = "".join(
                f"\n--- last lines of {component.log}:\n{tail(Path(component.log), 20)}"
                for component, _ in watch
            )
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{logs}")
        time.sleep(interval)


def died_message(component: Component, code: int | None) -> str:
    text = tail(Path(component.log), 30)
    hint = ""
    if "address already in use" in text:
        hint = (
            f"\nport {component.port} was taken by another process between picking it and starting "
            f"{component.name}; run `tools/cluster up` again"
        )
    return (
        f"{component.name} exited with code {code} during start-up; "
        f"last lines of {component.log}:\n{text}{hint}"
    )


class Launcher:
    """Starts components detached from this process and records each in state.json at once."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.processes: list[tuple[Component, subprocess.Popen[bytes]]] = []
        self.logs = Path(state.state_dir) / "logs"
        self.logs.mkdir(exist_ok=True)

    def start(
        self, name: str, args: list[str], *, port: int | None, env: dict[str, str] | None = None
    ) -> tuple[Component, subprocess.Popen[bytes]]:
        exe = args[0]
        if port is not None and port_in_use(port):
            raise ClusterError(f"port {port} on 127.0.0.1 (for {name}) is already in use by another process")
        log_path = self.logs / f"{name}.log"
        component, process = spawn(
            Component(name=name, pid=0, exe=exe, port=port, log=str(log_path), args=tuple(args), env=env),
            cwd=self.state.state_dir,
        )
        self.state = self.state.with_component(component)
        save_state(self.state)
        self.processes.append((component, process))
        return component, process


def spawn(component: Component, *, cwd: str) -> tuple[Component, subprocess.Popen[bytes]]:
    """Start ``component.args`` detached, appending to its log; the component with its new pid."""
    with Path(component.log).open("ab") as log_file:
        process = subprocess.Popen(
            component.args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=component.env if component.env is not None else component_env(),
            # A new session: Ctrl-C in the terminal that ran `up` must not stop the cluster.
            start_new_session=True,
        )
    return dataclasses.replace(component, pid=process.pid), process


def component_env() -> dict[str, str]:
    # Components get no KUBECONFIG or proxy settings from the caller: everything is explicit flags.
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {key: os.environ[key] for key in keep if key in os.environ}


def cluster_healthy(state: ClusterState) -> bool:
    if dead_components(state) or len(state.components) < 5:
        return False
    return ApiClient(state.server, Path(state.state_dir) / "pki").ready()


def prepare_state_dir(state_dir: Path) -> ClusterState | None:
    """Return the running, healthy cluster in `state_dir`, or clean up what is left of an old one."""
    state = load_state(state_dir)
    if state is not None:
        if cluster_healthy(state):
            return state
        dead = dead_components(state)
        reason = f"not running: {', '.join(dead)}" if dead else "the API server does not answer /readyz"
        log(f"stale state directory {state_dir} ({reason}); stopping what is left and cleaning it up")
        stop_components(state.components)
        remove_state_dir(state_dir)
    elif state_dir.exists():
        if (state_dir / MARKER_FILE).exists():
            log(f"stale state directory {state_dir} (an earlier `up` never finished); cleaning it up")
            remove_state_dir(state_dir)
        elif any(state_dir.iterdir()):
            raise ClusterError(
                f"{state_dir} exists, is not empty and is not a tools/cluster state directory; "
                "choose another --state-dir"
            )
    return None


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    """Whether an API object's status has condition ``kind`` with status True."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(item.get("type") == kind and item.get("status") == "True" for item in conditions)


def node_ready(node: dict[str, Any]) -> bool:
    ready = condition_true(node, "Ready")
    tainted = any(item.get("key") == NOT_READY_TAINT for item in node.get("spec", {}).get("taints", []))
    return ready and not tainted


def client_flags(profile: str, component: str) -> list[str]:
    """Client rate limits (and, for the controller manager, Job sync workers) of a profile.

    The upstream defaults (controller manager 20 QPS and 5 concurrent Job syncs, scheduler 50 QPS)
    make the job controller the bottleneck of any test with more than a few dozen Jobs; production
    clusters raise them. "fast" is such a production-like setting.
    """
    if profile == "stock":
        return []
    flags = ["--kube-api-qps=400", "--kube-api-burst=800"]
    if component == "kube-controller-manager":
        flags.append("--concurrent-job-syncs=50")
    return flags


def nodes_ready_timeout(nodes: int) -> float:
    """kwok makes nodes Ready at a bounded rate: 90 s covers a few dozen, 1,000 need minutes."""
    return 90.0 + 0.3 * nodes


def up(
    *,
    state_dir: Path,
    nodes: int,
    gpus_per_node: int,
    apiserver_port: int | None,
    profile: str = "fast",
    kueue: bool = False,
) -> ClusterState:
    require_built(kueue=kueue)
    started = time.monotonic()
    with state_lock(state_dir):
        running = prepare_state_dir(state_dir)
        if running is not None:
            has_kueue = any(component.name == "kueue" for component in running.components)
            if kueue and not has_kueue:
                raise ClusterError(
                    f"the cluster in {state_dir} runs without Kueue; `tools/cluster down` and `up --kueue`"
                )
            if (running.nodes, running.gpus_per_node, running.profile) != (nodes, gpus_per_node, profile):
                log(
                    f"note: the running cluster has {running.nodes} nodes x {running.gpus_per_node} GPUs "
                    f"({running.profile} profile); `tools/cluster down` first to change that"
                )
            log(f"cluster already up ({state_dir})")
            return running
        if apiserver_port is not None and port_in_use(apiserver_port):
            raise ClusterError(f"--apiserver-port {apiserver_port}: port already in use on 127.0.0.1")
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / MARKER_FILE).write_text("created by tools/cluster up; removed by tools/cluster down\n")
        try:
            state = start_cluster(
                state_dir,
                nodes=nodes,
                gpus_per_node=gpus_per_node,
                apiserver_port=apiserver_port,
                profile=profile,
            )
            if kueue:
                state = start_kueue(state)
        except BaseException:
            failed = load_state(state_dir)
            if failed is not None:
                stop_components(failed.components)
            log(f"start-up failed; logs kept in {state_dir}/logs (`tools/cluster down` removes them)")
            raise
    log(
        f"cluster ready in {format_seconds(time.monotonic() - started)}: "
        f"{nodes} nodes x {gpus_per_node} nvidia.com/gpu, {profile} profile"
        + (
            f", Kueue {BINARY_BY_NAME['kueue'].version()} (ClusterQueue {KUEUE_CLUSTER_QUEUE})"
            if kueue
            else ""
        )
    )
    return state


def start_cluster(
    state_dir: Path, *, nodes: int, gpus_per_node: int, apiserver_port: int | None, profile: str = "fast"
) -> ClusterState:
    phase_start = time.monotonic()

    def done(what: str) -> None:
        nonlocal phase_start
        log(f"  {what} ({format_seconds(time.monotonic() - phase_start)})")
        phase_start = time.monotonic()

    pki = state_dir / "pki"
    make_pki(pki)
    ports = pick_free_ports(5)
    etcd_port, peer_port, kcm_port, scheduler_port = ports[:4]
    api_port = apiserver_port if apiserver_port is not None else ports[4]
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = state_dir / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(server=server, pki=pki, user="admin"))
    kubeconfig.chmod(0o600)
    for user in ("controller-manager", "scheduler", "kwok"):
        (state_dir / f"{user}.kubeconfig").write_text(kubeconfig_text(server=server, pki=pki, user=user))
    binaries = {binary.name: str(binary.path()) for binary in BINARIES}
    launcher = Launcher(
        ClusterState(
            state_dir=str(state_dir),
            kubeconfig=str(kubeconfig),
            server=server,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            binaries=binaries,
            profile=profile,
        )
    )
    save_state(launcher.state)
    done("certificates and kubeconfigs")

    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = launcher.start(
        "etcd",
        [
            binaries["etcd"], "--name=kubealign", f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubealign={peer_url}", "--initial-cluster-state=new",
            # Throwaway data: skipping fsync makes every API write several times faster.
            "--unsafe-no-fsync", "--log-level=warn",
        ],
        port=etcd_port,
    )  # fmt: skip
    wait_for("etcd /health", lambda: http_ok(f"{etcd_url}/health"), timeout=30, watch=[etcd])
    done("etcd ready")

    apiserver = launcher.start(
        "kube-apiserver",
        [
            binaries["kube-apiserver"], f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            # No endpoints for the `kubernetes` Service: 127.0.0.1 is not a valid endpoint address.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={state_dir / 'apiserver'}", "--profiling=false",
        ],
        port=api_port,
    )  # fmt: skip
    api = ApiClient(server, pki)
    wait_for("kube-apiserver /readyz", api.ready, timeout=90, watch=[etcd, apiserver])
    done("kube-apiserver ready")

    controller_manager = launcher.start(
        "kube-controller-manager",
        [
            binaries["kube-controller-manager"],
            f"--kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={state_dir / 'controller-manager'}",
            "--leader-elect=false", f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            # Remove the not-ready taint within a second or two of a node turning Ready.
            "--node-monitor-period=1s",
            *client_flags(profile, "kube-controller-manager"),
        ],
        port=kcm_port,
    )  # fmt: skip
    scheduler = launcher.start(
        "kube-scheduler",
        [
            binaries["kube-scheduler"], f"--kubeconfig={state_dir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={scheduler_port}",
            f"--cert-dir={state_dir / 'scheduler'}",
            "--leader-elect=false",
            *client_flags(profile, "kube-scheduler"),
        ],
        port=scheduler_port,
    )  # fmt: skip

    kubectl = subprocess.run(
        [*kubectl_command(state_dir), "apply", "--server-side", f"--filename={kwok_stage_crd_path()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if kubectl.returncode != 0:
        raise ClusterError(f"applying kwok's Stage CRD failed:\n{kubectl.stdout}{kubectl.stderr}")

    def stage_crd_established() -> bool:
        status, crd = api.request(
            "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/stages.kwok.x-k8s.io"
        )
        return status == 200 and condition_true(crd, "Established")

    wait_for("kwok Stage CRD established", stage_crd_established, timeout=30, watch=[apiserver])
    for item in kwok_stages():
        api.create("/apis/kwok.x-k8s.io/v1alpha1/stages", item)
    for index in range(nodes):
        api.create("/api/v1/nodes", fake_node(index, gpus=gpus_per_node))
    done(f"kwok Stages and {nodes} fake nodes created")

    # HOME points into the state dir so kwok never loads a user's ~/.kwok/kwok.yaml.
    kwok_env = {**component_env(), "HOME": str(state_dir)}
    kwok = launcher.start(
        "kwok",
        [
            binaries["kwok"], f"--kubeconfig={state_dir / 'kwok.kubeconfig'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--enable-crds=Stage", f"--cidr={POD_CIDR}", "--node-ip=10.240.0.1",
            "--node-lease-duration-seconds=40",
        ],
        port=None,
        env=kwok_env,
    )  # fmt: skip
    watch = [etcd, apiserver, controller_manager, scheduler, kwok]

    def all_nodes_ready() -> bool:
        status, reply = api.request("GET", "/api/v1/nodes")
        items = reply.get("items", []) if status == 200 else []
        return len(items) >= nodes and all(node_ready(node) for node in items)

    wait_for(
        f"{nodes} nodes Ready and untainted", all_nodes_ready, timeout=nodes_ready_timeout(nodes), watch=watch
    )
    done("nodes Ready")

    def default_service_account() -> bool:
        return api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

    wait_for(
        "the default ServiceAccount (controller manager working)",
        default_service_account,
        timeout=60,
        watch=watch,
    )
    wait_for(
        "kube-scheduler and kube-controller-manager /healthz",
        lambda: (
            http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", insecure=True)
            and http_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure=True)
        ),
        timeout=60,
        watch=watch,
    )
    done("controllers healthy")
    return launcher.state


# ---------------------------------------------------------------------------------------------
# Kueue: quotas and all-or-nothing admission for the operator's Jobs

KUEUE_NAMESPACE = "kueue-system"
KUEUE_FLAVOR = "default-flavor"
KUEUE_CLUSTER_QUEUE = "kubealign-gpus"
KUEUE_LOCAL_QUEUE = "default"
# How long a Job admitted by Kueue may take for all its pods to be ready before Kueue evicts it and
# gives the quota to others (waitForPodsReady): all-or-nothing admission of multi-node stages.
KUEUE_PODS_READY_TIMEOUT = "5m"


def kueue_config(*, health_port: int, webhook_port: int, cert_dir: Path, profile: str) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a controller on this machine."""
    qps = {"qps": 400, "burst": 800} if profile != "stock" else {"qps": 50, "burst": 100}
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        # Served on 127.0.0.1 with our CA's certificate; the webhook configurations name it by URL.
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "waitForPodsReady": {"timeout": KUEUE_PODS_READY_TIMEOUT, "blockAdmission": True},
        "clientConnection": qps,
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API server needs an APIService and its own certificates; nothing here reads it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def json_documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects of kubectl's output for a multi-document file (one after the other)."""
    decoder = json.JSONDecoder()
    documents: list[dict[str, Any]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return documents
        document, position = decoder.raw_decode(text, position)
        documents.append(document)


def kueue_webhooks(listed: dict[str, Any], *, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations rewritten to call ``url`` + path (no Service here), keeping only
    the webhooks of what this Kueue serves: its own resources and batch Jobs. A webhook for a
    disabled integration (pods, Deployments, ...) would answer 404 and, failing closed, block them."""
    served = ("-kueue-x-k8s-io-", "-batch-v1-job")
    configurations = []
    for item in listed.get("items", [listed]):
        webhooks = []
        for webhook in item.get("webhooks", []):
            path = webhook["clientConfig"]["service"]["path"]
            if any(marker in path for marker in served):
                webhooks.append({**webhook, "clientConfig": {"url": url + path, "caBundle": ca_bundle}})
        configurations.append(
            {
                "apiVersion": item["apiVersion"],
                "kind": item["kind"],
                "metadata": {"name": f"kueue-{item['metadata']['name']}"},
                "webhooks": webhooks,
            }
        )
    return configurations


def kueue_queues(state: ClusterState) -> list[tuple[str, dict[str, Any]]]:
    """A ResourceFlavor, the ClusterQueue ``kubealign-gpus`` whose quota is the fake nodes' total
    (so a stage is admitted exactly when it fits the cluster), and the LocalQueue ``default``."""
    node = fake_node(0, gpus=state.gpus_per_node)["status"]["capacity"]
    quota = {
        "cpu": str(int(node["cpu"]) * state.nodes),
        "memory": f"{int(node['memory'].removesuffix('Gi')) * state.nodes}Gi",
        "nvidia.com/gpu": str(state.gpus_per_node * state.nodes),
    }
    base = "/apis/kueue.x-k8s.io/v1beta2"
    return [
        (
            f"{base}/resourceflavors",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ResourceFlavor",
                "metadata": {"name": KUEUE_FLAVOR},
            },
        ),
        (
            f"{base}/clusterqueues",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ClusterQueue",
                "metadata": {"name": KUEUE_CLUSTER_QUEUE},
                "spec": {
                    "namespaceSelector": {},
                    "queueingStrategy": "BestEffortFIFO",
                    "resourceGroups": [
                        {
                            "coveredResources": list(quota),
                            "flavors": [
                                {
                                    "name": KUEUE_FLAVOR,
                                    "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()],
                                }
                            ],
                        }
                    ],
                    # A higher-priority run may evict a lower-priority one to get the GPUs.
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                },
            },
        ),
        (
            "/apis/kueue.x-k8s.io/v1beta2/namespaces/default/localqueues",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "LocalQueue",
                "metadata": {"name": KUEUE_LOCAL_QUEUE, "namespace": "default"},
                "spec": {"clusterQueue": KUEUE_CLUSTER_QUEUE},
            },
        ),
    ]


# Kueue v0.17 without its internal certificate management loads a serving certificate for its
# metrics endpoint from this fixed path at start-up, and exits if there is none, even with metrics
# off (bindAddress "0", as here). Nothing is served with it.
KUEUE_METRICS_CERTS = Path("/etc/kueue/metrics/certs")


def provide_kueue_metrics_certificate(pki: Path) -> None:
    if (KUEUE_METRICS_CERTS / "tls.crt").is_file() and (KUEUE_METRICS_CERTS / "tls.key").is_file():
        return
    try:
        KUEUE_METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        for suffix in ("crt", "key"):
            partial = KUEUE_METRICS_CERTS / f".tls.{suffix}.partial-{os.getpid()}"
            shutil.copyfile(pki / f"kueue-webhook.{suffix}", partial)
            os.replace(partial, KUEUE_METRICS_CERTS / f"tls.{suffix}")
    except OSError as error:
        raise ClusterError(
            f"Kueue needs a certificate at {KUEUE_METRICS_CERTS}/tls.crt and tls.key before it starts "
            f"(any valid pair: its metrics are off here) and this user cannot write it ({error}); "
            f"create them once, e.g. with sudo, and run `up --kueue` again"
        ) from error


def start_kueue(state: ClusterState) -> ClusterState:
    """Start Kueue's controller manager against the running control plane; see kueue_config."""
    phase_start = time.monotonic()
    state_dir = Path(state.state_dir)
    pki = state_dir / "pki"
    manifests = kueue_manifests_dir()
    api = ApiClient(state.server, pki)
    kubectl = kubectl_command(state_dir)

    applied = subprocess.run(
        [*kubectl, "apply", "--server-side", f"--filename={manifests / 'crd'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if applied.returncode != 0:
        raise ClusterError(f"applying Kueue's CRDs failed:\n{applied.stdout}{applied.stderr}")

    def established() -> bool:
        _, reply = api.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        crds = [item for item in reply.get("items", []) if item["spec"]["group"] == "kueue.x-k8s.io"]
        return bool(crds) and all(condition_true(item, "Established") for item in crds)

    wait_for("Kueue's CRDs established", established, timeout=60)
    api.create(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}}
    )

    cert_dir = state_dir / "kueue" / "certs"
    cert_dir.mkdir(parents=True)
    issue_certificate(
        pki,
        "kueue-webhook",
        "/CN=kueue-webhook",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost",
    )
    shutil.copyfile(pki / "kueue-webhook.crt", cert_dir / "tls.crt")
    shutil.copyfile(pki / "kueue-webhook.key", cert_dir / "tls.key")
    provide_kueue_metrics_certificate(pki)
    health_port, webhook_port, visibility_port = pick_free_ports(3)
    config = state_dir / "kueue" / "config.yaml"
    # JSON is YAML: the standard library writes it.
    config.write_text(
        json.dumps(
            kueue_config(
                health_port=health_port, webhook_port=webhook_port, cert_dir=cert_dir, profile=state.profile
            ),
            indent=2,
        )
    )
    (state_dir / "kueue.kubeconfig").write_text(kubeconfig_text(server=state.server, pki=pki, user="admin"))
    launcher = Launcher(state)
    kueue = launcher.start(
        "kueue",
        [
            state.binaries.get("kueue", str(BINARY_BY_NAME["kueue"].path())),
            f"--config={config}", f"--kubeconfig={state_dir / 'kueue.kubeconfig'}",
            f"--visibility-server-port={visibility_port}",
        ],
        # Its health port: what `restart` and `status` need (the webhook port is in its config).
        port=health_port,
        env={**component_env(), "KUBECONFIG": str(state_dir / "kueue.kubeconfig")},
    )  # fmt: skip
    wait_for("Kueue /readyz", ready_check(launcher.state, kueue[0]), timeout=90, watch=[kueue])

    listed = subprocess.run(
        [*kubectl, "create", "--dry-run=client", "--output=json", f"--filename={manifests / 'webhook.yaml'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listed.returncode != 0:
        raise ClusterError(f"reading Kueue's webhook manifests failed:\n{listed.stderr}")
    ca_bundle = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
    listed_items = {"items": json_documents(listed.stdout)}
    for configuration in kueue_webhooks(
        listed_items, url=f"https://127.0.0.1:{webhook_port}", ca_bundle=ca_bundle
    ):
        plural = (
            "mutatingwebhookconfigurations"
            if configuration["kind"].startswith("Mutating")
            else "validatingwebhookconfigurations"
        )
        api.create(f"/apis/admissionregistration.k8s.io/v1/{plural}", configuration)

    # The webhooks validate the queues; creating them also proves the API server reaches Kueue.
    def creator(path: str, body: dict[str, Any]) -> Callable[[], bool]:
        return lambda: api.request("POST", path, body)[0] in (200, 201, 409)

    for path, body in kueue_queues(launcher.state):
        what = f"{body['kind']} {body['metadata']['name']} created"
        wait_for(what, creator(path, body), timeout=60, watch=[kueue])

    def cluster_queue_active() -> bool:
        status, reply = api.request(
            "GET", f"/apis/kueue.x-k8s.io/v1beta2/clusterqueues/{KUEUE_CLUSTER_QUEUE}"
        )
        return status == 200 and condition_true(reply, "Active")

    wait_for(f"ClusterQueue {KUEUE_CLUSTER_QUEUE} active", cluster_queue_active, timeout=60, watch=[kueue])
    log(f"  Kueue ready ({format_seconds(time.monotonic() - phase_start)})")
    return launcher.state


def down(*, state_dir: Path) -> None:
    with state_lock(state_dir):
        state = load_state(state_dir)
        if state is None:
            if (state_dir / MARKER_FILE).exists():
                remove_state_dir(state_dir)
                log(f"removed incomplete state directory {state_dir}")
            else:
                log(f"no cluster in {state_dir}; nothing to stop")
            return
        alive = [component for component in state.components if component.alive()]
        stop_components(state.components)
        remove_state_dir(state_dir)
        log(f"stopped {', '.join(c.name for c in alive) or 'nothing (all had exited)'}; removed {state_dir}")


def ready_check(state: ClusterState, component: Component) -> Callable[[], bool]:
    """How to tell that a (re)started component serves again; components without an endpoint only
    have to stay up (wait_for watches the process)."""
    if component.name == "kube-apiserver":
        return ApiClient(state.server, Path(state.state_dir) / "pki").ready
    if component.name == "etcd":
        return lambda: http_ok(f"http://127.0.0.1:{component.port}/health")
    if component.name == "kueue":
        return lambda: http_ok(f"http://127.0.0.1:{component.port}/readyz")
    if component.port is not None:
        return lambda: http_ok(f"https://127.0.0.1:{component.port}/healthz", insecure=True)
    return lambda: True


def restart(*, state_dir: Path, name: str, down_seconds: float = 0.0) -> ClusterState:
    """Stop one component (SIGTERM, as a node's shutdown would), keep it down for ``down_seconds``
    (an outage clients have to ride out), then start it again with the same flags and wait until it
    serves. Everything else keeps running throughout."""
    with state_lock(state_dir):
        state = load_state(state_dir)
        if state is None:
            raise ClusterError(f"no cluster in {state_dir}; run `tools/cluster up` first")
        component = state.component(name)
        if not component.args:
            raise ClusterError(
                f"{state_dir} was started by an older tools/cluster that did not record how; "
                "run `tools/cluster down` and `up` again"
            )
        stop_components([component])
        log(f"stopped {name} (pid {component.pid}); down for {format_seconds(down_seconds)}")
        time.sleep(down_seconds)
        restarted, process = spawn(component, cwd=state.state_dir)
        state = state.replacing(restarted)
        save_state(state)
        started = time.monotonic()
        wait_for(
            f"{name} to serve again", ready_check(state, restarted), timeout=90, watch=[(restarted, process)]
        )
        serving = format_seconds(time.monotonic() - started)
        log(f"{name} restarted (pid {restarted.pid}), serving after {serving}")
        return state


def status(*, state_dir: Path, out: TextIO) -> int:
    state = load_state(state_dir)
    if state is None:
        print(f"no cluster in {state_dir}", file=out)
        return 3
    print(f"{'COMPONENT':<24} {'PID':>8} {'ALIVE':<6} {'PORT':>6} {'RSS':>10}", file=out)
    total = 0
    for component in state.components:
        alive = component.alive()
        rss = resident_bytes(component.pid) if alive else 0
        total += rss
        port = str(component.port) if component.port is not None else "-"
        alive_text = "yes" if alive else "NO"
        print(
            f"{component.name:<24} {component.pid:>8} {alive_text:<6} {port:>6} {rss / 2**20:>7.0f} MiB",
            file=out,
        )
    print(f"{'total resident memory':<48} {total / 2**20:>7.0f} MiB", file=out)
    print(f"server: {state.server}  nodes: {state.nodes} x {state.gpus_per_node} nvidia.com/gpu", file=out)
    print(f"kubeconfig: {state.kubeconfig}", file=out)
    return 0 if not dead_components(state) else 1


# ---------------------------------------------------------------------------------------------
# Command line


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="tools/cluster",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        epilog=__doc__.split("Subcommands:", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the binaries, or find them cached")
    state_option = argparse.ArgumentParser(add_help=False)
    state_option.add_argument(
        "--state-dir",
        type=lambda text: Path(text).expanduser().resolve(),
        default=None,
        help="where PIDs, ports, certificates, logs and the kubeconfig live "
        "(default: $KUBEALIGN_STATE_DIR or <cache>/state/<hash of this checkout>)",
    )
    start = commands.add_parser("up", parents=[state_option], help="start the control plane (idempotent)")
    start.add_argument("--nodes", type=positive, default=4, help="fake GPU nodes (default 4)")
    start.add_argument(
        "--gpus-per-node", type=positive, default=8, help="nvidia.com/gpu per node (default 8)"
    )
    start.add_argument(
        "--apiserver-port", type=positive, default=None, help="fixed API server port (default: a free one)"
    )
    start.add_argument(
        "--stock",
        dest="profile",
        action="store_const",
        const="stock",
        default="fast",
        help="upstream client rate limits and Job sync workers instead of the production-like profile",
    )
    start.add_argument(
        "--kueue",
        action="store_true",
        help=f"also start Kueue, with ClusterQueue {KUEUE_CLUSTER_QUEUE} (quota: every fake GPU) "
        f"and LocalQueue {KUEUE_LOCAL_QUEUE} in the default namespace",
    )
    commands.add_parser("down", parents=[state_option], help="stop the control plane and remove its state")
    commands.add_parser(
        "status", parents=[state_option], help="what runs: component, pid, alive, port, memory"
    )
    again = commands.add_parser(
        "restart", parents=[state_option], help="stop one component, optionally keep it down, start it again"
    )
    again.add_argument("name", help="component name as `status` lists it (kube-apiserver, etcd, ...)")
    again.add_argument(
        "--down-seconds",
        type=float,
        default=0.0,
        help="how long it stays down between stop and start (default 0): an outage to ride out",
    )
    commands.add_parser(
        "kubeconfig", parents=[state_option], help="print the kubeconfig path of a running cluster"
    )
    which = commands.add_parser("which", help="print the cached path of a binary")
    which.add_argument("name", choices=sorted(BINARY_BY_NAME))
    commands.add_parser(
        "kubectl", help="kubectl ARGS... against the cluster (cached kubectl)", add_help=False
    )
    return root


def kubectl_command(state_dir: Path) -> list[str]:
    # Discovery cache in the state dir: nothing lands in ~/.kube, and it goes away with `down`.
    return [
        str(BINARY_BY_NAME["kubectl"].path()),
        f"--kubeconfig={state_dir / 'kubeconfig'}",
        f"--cache-dir={state_dir / 'kubectl-cache'}",
    ]


def exec_kubectl(args: list[str]) -> int:
    state_dir = default_state_dir()
    if args[:1] == ["--state-dir"] and len(args) >= 2:
        state_dir, args = Path(args[1]).expanduser().resolve(), args[2:]
    state = load_state(state_dir)
    if state is None:
        raise ClusterError(f"no cluster in {state_dir}; run `tools/cluster up` first")
    command = kubectl_command(Path(state.state_dir))
    os.execv(command[0], [*command, *args])


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    try:
        if args_list[:1] == ["kubectl"]:
            return exec_kubectl(args_list[1:])
        args = parser().parse_args(args_list)
        state_dir: Path = getattr(args, "state_dir", None) or default_state_dir()
        if args.command == "build":
            build()
        elif args.command == "up":
            state = up(
                state_dir=state_dir,
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                apiserver_port=args.apiserver_port,
                profile=args.profile,
                kueue=args.kueue,
            )
            print(state.kubeconfig, flush=True)
        elif args.command == "down":
            down(state_dir=state_dir)
        elif args.command == "status":
            return status(state_dir=state_dir, out=sys.stdout)
        elif args.command == "restart":
            restart(state_dir=state_dir, name=args.name, down_seconds=args.down_seconds)
        elif args.command == "kubeconfig":
            recorded = load_state(state_dir)
            if recorded is None:
                raise ClusterError(f"no cluster in {state_dir}; run `tools/cluster up` first")
            print(recorded.kubeconfig)
        elif args.command == "which":
            path = BINARY_BY_NAME[args.name].path()
            if not path.is_file():
                raise ClusterError(f"{args.name} is not built yet ({path}); run `tools/cluster build`")
            print(path)
    except ClusterError as error:
        log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0
