"""Unit tests of tools/cluster's helpers (tools/localcluster.py) and of its commands that need no
control plane: version parsing, port picking, stale state detection and clean-up, refusals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import localcluster
from localcluster import ClusterState, Component

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_TOOL = REPO_ROOT / "tools" / "cluster"


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER_TOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("go version go1.26.8 linux/amd64", (1, 26, 8)),
        ("go version go1.26 darwin/arm64", (1, 26, 0)),
        ("go version go1.22.1 linux/amd64", (1, 22, 1)),
        ("command not found", None),
    ],
)
def test_parse_go_version(output: str, expected: tuple[int, ...] | None) -> None:
    assert localcluster.parse_go_version(output) == expected


def test_go_mod_requirement_reads_single_line_and_block_forms() -> None:
    go_mod = (
        "module x\n\ngo 1.26.0\n\nrequire sigs.k8s.io/kwok v0.8.0\n\n"
        "require (\n\tk8s.io/api v0.35.4 // indirect\n)\n"
    )
    assert localcluster.go_mod_requirement(go_mod, "sigs.k8s.io/kwok") == "v0.8.0"
    assert localcluster.go_mod_requirement(go_mod, "k8s.io/api") == "v0.35.4"
    assert localcluster.go_mod_go_version(go_mod) == (1, 26, 0)
    with pytest.raises(localcluster.ClusterError, match=r"does not require k8s\.io/apim"):
        localcluster.go_mod_requirement(go_mod, "k8s.io/apim")


def test_binaries_are_cached_by_the_versions_the_wrapper_modules_pin(tmp_path: Path) -> None:
    apiserver = localcluster.BINARY_BY_NAME["kube-apiserver"]
    assert apiserver.path(tmp_path) == tmp_path / "bin" / "kubernetes-v1.35.4" / "kube-apiserver"
    assert localcluster.BINARY_BY_NAME["etcd"].path(tmp_path).parent.name == "etcd-v3.6.16"
    assert localcluster.required_go_version() >= (1, 26)
    assert "-X k8s.io/component-base/version.gitVersion=v1.35.4" in apiserver.ldflags()
    assert localcluster.BINARY_BY_NAME["kwok"].ldflags() == "-s -w"


def test_helm_assumes_the_kubernetes_version_of_its_client_go_offline() -> None:
    """As helm's Makefile does: client-go v0.N.x speaks Kubernetes 1.N, which `helm template` assumes."""
    helm = localcluster.BINARY_BY_NAME["helm"]
    client_go = helm.requirement("k8s.io/client-go")
    minor = client_go.split(".")[1]
    assert localcluster.helm_kube_version(client_go) == ("1", minor)
    flags = helm.ldflags().split()
    for package in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        assert f"{package}.k8sVersionMajor=1" in flags
        assert f"{package}.k8sVersionMinor={minor}" in flags
    assert f"helm.sh/helm/v3/internal/version.version={helm.version()}" in flags
    assert localcluster.helm_kube_version("v0.37.2") == ("1", "37")
    with pytest.raises(localcluster.ClusterError, match="client-go"):
        localcluster.helm_kube_version("v1.37")


def test_the_build_key_follows_the_flags() -> None:
    keys = {binary.name: binary.build_key() for binary in localcluster.BINARIES}
    # One wrapper module, one set of flags, but different packages: different binaries.
    assert len(set(keys.values())) == len(keys)
    assert all(len(key) == 12 for key in keys.values())


def test_built_kubectl_reports_the_pinned_version() -> None:
    kubectl = localcluster.BINARY_BY_NAME["kubectl"]
    if not kubectl.path().is_file():
        pytest.skip("kubectl not built (tools/cluster build)")
    result = subprocess.run(
        [str(kubectl.path()), "version", "--client", "--output=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["clientVersion"]["gitVersion"] == kubectl.version()


def test_picked_ports_are_distinct_and_free() -> None:
    ports = localcluster.pick_free_ports(6)
    assert len(set(ports)) == 6
    assert not any(localcluster.port_in_use(port) for port in ports)


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert localcluster.port_in_use(port)
    assert not localcluster.port_in_use(port)


def test_process_alive_checks_the_program_not_just_the_pid() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    process = subprocess.Popen([sleep, "30"])
    try:
        assert localcluster.process_alive(process.pid, sleep)
        # A reused PID running some other program is not ours.
        assert not localcluster.process_alive(process.pid, "/nonexistent/etcd")
    finally:
        process.kill()
        process.wait()
    assert not localcluster.process_alive(process.pid, sleep)


def state_with(tmp_path: Path, components: tuple[Component, ...]) -> ClusterState:
    return ClusterState(
        state_dir=str(tmp_path),
        kubeconfig=str(tmp_path / "kubeconfig"),
        server="https://127.0.0.1:1",
        nodes=4,
        gpus_per_node=8,
        components=components,
    )


def test_dead_components_names_the_ones_that_exited(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    finished = subprocess.Popen([sleep, "0"])
    finished.wait()
    running = subprocess.Popen([sleep, "30"])
    try:
        state = state_with(
            tmp_path,
            (
                Component(name="etcd", pid=finished.pid, exe=sleep, port=1, log="etcd.log"),
                Component(name="kwok", pid=running.pid, exe=sleep, port=None, log="kwok.log"),
            ),
        )
        assert localcluster.dead_components(state) == ["etcd"]
        assert ClusterState.from_json(state.to_json()) == state
    finally:
        running.kill()
        running.wait()


def write_state(state_dir: Path, state: ClusterState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / localcluster.MARKER_FILE).write_text("")
    localcluster.save_state(state)


def test_restart_stops_a_component_and_starts_it_again_with_the_same_flags(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    state_dir = tmp_path / "state"
    (state_dir / "logs").mkdir(parents=True)
    first = subprocess.Popen([sleep, "300"], start_new_session=True)
    untouched = subprocess.Popen([sleep, "300"], start_new_session=True)
    log = state_dir / "logs" / "kwok.log"
    kwok = Component(name="kwok", pid=first.pid, exe=sleep, port=None, log=str(log), args=(sleep, "300"))
    other = Component(name="etcd", pid=untouched.pid, exe=sleep, port=None, log=str(log), args=(sleep, "300"))
    write_state(state_dir, state_with(state_dir, (other, kwok)))
    restarted_pid = 0
    try:
        result = run_tool("restart", "kwok", "--down-seconds", "0.5", "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        assert first.wait(timeout=15) == -15  # SIGTERM
        reloaded = localcluster.load_state(state_dir)
        assert reloaded is not None
        restarted = reloaded.component("kwok")
        restarted_pid = restarted.pid
        assert restarted_pid != first.pid and restarted.alive()
        assert restarted.args == kwok.args and reloaded.components[0] == other  # order and the rest kept
        assert untouched.poll() is None

        missing = run_tool("restart", "kube-scheduler", "--state-dir", str(state_dir))
        assert missing.returncode == 1
        assert "no component 'kube-scheduler'" in missing.stderr and "etcd, kwok" in missing.stderr
    finally:
        for process in (first, untouched):
            process.kill()
            process.wait()
        if restarted_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restarted_pid, signal.SIGKILL)


def test_restart_refuses_a_state_recorded_without_flags(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    state_dir = tmp_path / "state"
    survivor = subprocess.Popen([sleep, "300"], start_new_session=True)
    try:
        component = Component(name="kwok", pid=survivor.pid, exe=sleep, port=None, log="kwok.log")
        write_state(state_dir, state_with(state_dir, (component,)))
        result = run_tool("restart", "kwok", "--state-dir", str(state_dir))
        assert result.returncode == 1
        assert "did not record how" in result.stderr
        assert survivor.poll() is None  # nothing was stopped
    finally:
        survivor.kill()
        survivor.wait()


def test_down_cleans_up_a_stale_state_dir_and_stops_survivors(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    state_dir = tmp_path / "state"
    finished = subprocess.Popen([sleep, "0"])
    finished.wait()
    survivor = subprocess.Popen([sleep, "300"], start_new_session=True)
    state = state_with(
        state_dir,
        (
            Component(name="etcd", pid=finished.pid, exe=sleep, port=1, log="etcd.log"),
            Component(name="kwok", pid=survivor.pid, exe=sleep, port=None, log="kwok.log"),
        ),
    )
    write_state(state_dir, state)

    status = run_tool("status", "--state-dir", str(state_dir))
    down = run_tool("down", "--state-dir", str(state_dir))

    assert status.returncode == 1
    assert "etcd" in status.stdout and "NO" in status.stdout
    assert down.returncode == 0, down.stderr
    assert survivor.wait(timeout=15) == -15  # SIGTERM
    assert not state_dir.exists()


def test_down_without_a_cluster_is_a_no_op(tmp_path: Path) -> None:
    result = run_tool("down", "--state-dir", str(tmp_path / "nothing"))
    assert result.returncode == 0
    assert "nothing to stop" in result.stderr


def test_down_refuses_to_delete_a_directory_it_did_not_create(tmp_path: Path) -> None:
    state_dir = tmp_path / "precious"
    state = state_with(state_dir, ())
    state_dir.mkdir()
    localcluster.save_state(state)

    with pytest.raises(localcluster.ClusterError, match="refusing to delete"):
        localcluster.down(state_dir=state_dir)
    assert (state_dir / localcluster.STATE_FILE).exists()


def test_up_refuses_a_foreign_non_empty_state_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(localcluster.ClusterError, match="not a tools/cluster state directory"):
        localcluster.prepare_state_dir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_status_without_a_cluster_says_so(tmp_path: Path) -> None:
    result = run_tool("status", "--state-dir", str(tmp_path / "nothing"))
    assert result.returncode == 3
    assert "no cluster" in result.stdout


@pytest.mark.parametrize(
    ("context", "allowed"),
    [
        ("kind-kubealign", True),
        ("kwok-kubealign", True),
        ("my-test-cluster", True),
        ("throwaway", True),
        ("prod-eu-west-1", False),
        ("arn:aws:eks:us-east-1:1:cluster/main", False),
        ("minikube", False),
    ],
)
def test_only_throwaway_contexts_may_be_used_by_tests(context: str, allowed: bool) -> None:
    assert localcluster.is_throwaway_context(context) is allowed


def test_fake_nodes_advertise_gpus_and_are_played_by_our_kwok() -> None:
    node = localcluster.fake_node(2, gpus=8)
    assert node["metadata"]["name"] == "kwok-gpu-2"
    assert node["metadata"]["annotations"] == {localcluster.KWOK_NODE_ANNOTATION: "fake"}
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


def fake_go(directory: Path, script: str) -> Path:
    go = directory / "go"
    go.write_text("#!/bin/sh\n" + script)
    go.chmod(0o755)
    return go


def test_missing_go_is_reported_with_the_version_needed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(localcluster.ClusterError, match=r"Go toolchain not found on PATH.*Go >= 1\.26"):
        localcluster.check_go()


def test_too_old_go_is_reported_with_what_was_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_go(tmp_path, 'echo "go version go1.22.1 linux/amd64"\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    # The newest `go` line of the wrapper modules (tools/go/*/go.mod) is what is asked for.
    needed = re.escape(".".join(map(str, localcluster.required_go_version())))
    with pytest.raises(
        localcluster.ClusterError, match=rf"Go {needed} or newer.*found `go version go1\.22\.1"
    ):
        localcluster.check_go()


def test_a_failing_build_names_the_component_and_shows_the_go_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBEALIGN_CACHE_DIR", str(tmp_path / "cache"))
    go = fake_go(
        tmp_path, 'echo "# k8s.io/kubernetes/cmd/kube-scheduler"; echo "undefined: frobnicate"; exit 2\n'
    )
    scheduler = localcluster.BINARY_BY_NAME["kube-scheduler"]

    with pytest.raises(localcluster.ClusterError) as failure:
        localcluster.build_binary(str(go), scheduler, 1, 1)

    assert "building kube-scheduler failed (exit 2)" in str(failure.value)
    assert "undefined: frobnicate" in str(failure.value)
    assert not scheduler.path().exists()
    assert list(scheduler.path().parent.iterdir()) == []  # no half-written binary left behind


def test_a_build_moves_the_binary_into_the_cache_only_when_it_succeeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBEALIGN_CACHE_DIR", str(tmp_path / "cache"))
    # Stands in for `go build ... -o OUT PKG`: writes OUT.
    go = fake_go(tmp_path, 'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done; echo built >"$out"')
    etcd = localcluster.BINARY_BY_NAME["etcd"]

    localcluster.build_binary(str(go), etcd, 1, 1)

    assert etcd.path().read_text() == "built\n"
    log = (tmp_path / "cache" / "build-logs" / f"etcd-{etcd.version()}.log").read_text()
    assert "-trimpath -ldflags -s -w -o" in log
    assert etcd.stamp_path().read_text() == f"{etcd.build_key()}\n"
    assert etcd.current()


def test_a_binary_built_with_other_flags_is_rebuilt_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBEALIGN_CACHE_DIR", str(tmp_path / "cache"))
    builds = tmp_path / "builds"
    fake_go(
        tmp_path,
        'if [ "$1" = version ]; then echo "go version go1.26.8 linux/amd64"; exit 0; fi\n'
        f'echo "$@" >>"{builds}"\n'
        'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done; echo rebuilt >"$out"\n',
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    helm = localcluster.BINARY_BY_NAME["helm"]
    for binary in localcluster.BINARIES:
        binary.path().parent.mkdir(parents=True, exist_ok=True)
        binary.path().write_text("cached\n")
        if binary is not helm:
            binary.stamp_path().write_text(f"{binary.build_key()}\n")
    localcluster.kwok_stage_crd_path().parent.mkdir(parents=True)
    localcluster.kwok_stage_crd_path().write_text("kind: CustomResourceDefinition\n")
    localcluster.kueue_manifests_dir().mkdir(parents=True)
    (localcluster.kueue_manifests_dir() / "webhook.yaml").write_text("kind: MutatingWebhookConfiguration\n")

    # Built before build keys existed, or with other flags: stale for `build`, still usable by `up`.
    assert localcluster.stale_binaries() == [helm]
    helm.stamp_path().write_text("0123456789ab\n")
    assert localcluster.stale_binaries() == [helm]
    assert localcluster.missing_binaries() == []

    localcluster.build()
    localcluster.build()

    (command,) = builds.read_text().splitlines()
    assert helm.ldflags() in command and helm.package in command
    assert helm.path().read_text() == "rebuilt\n" and helm.current()
    assert localcluster.stale_binaries() == []
    assert localcluster.BINARY_BY_NAME["kubectl"].path().read_text() == "cached\n"


def test_a_component_dying_at_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "etcd.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            ["sh", "-c", "echo 'listen tcp 127.0.0.1:2379: bind: address already in use'; exit 1"],
            stdout=log_file,
        )
    component = Component(name="etcd", pid=process.pid, exe="/bin/sh", port=2379, log=str(log_path))

    with pytest.raises(localcluster.ClusterError) as failure:
        localcluster.wait_for("etcd /health", lambda: False, timeout=30, watch=[(component, process)])

    message = str(failure.value)
    assert "etcd exited with code 1 during start-up" in message
    assert "address already in use" in message
    assert "port 2379 was taken by another process" in message


@pytest.mark.parametrize(
    ("profile", "component", "flags"),
    [
        (
            "fast",
            "kube-controller-manager",
            ["--kube-api-qps=400", "--kube-api-burst=800", "--concurrent-job-syncs=50"],
        ),
        ("fast", "kube-scheduler", ["--kube-api-qps=400", "--kube-api-burst=800"]),
        ("stock", "kube-controller-manager", []),
        ("stock", "kube-scheduler", []),
    ],
)
def test_profiles_set_client_rate_limits(profile: str, component: str, flags: list[str]) -> None:
    assert localcluster.client_flags(profile, component) == flags


def test_the_node_wait_grows_with_the_node_count() -> None:
    assert localcluster.nodes_ready_timeout(4) >= 90
    # 1,000 nodes took about 3.5 minutes on the stock profile: the wait must cover that.
    assert localcluster.nodes_ready_timeout(1000) >= 300


def test_a_state_file_without_a_profile_was_written_by_a_stock_cluster(tmp_path: Path) -> None:
    state = ClusterState(state_dir=str(tmp_path), kubeconfig="k", server="s", nodes=1, gpus_per_node=1)
    assert ClusterState.from_json(state.to_json()).profile == "fast"
    old = state.to_json()
    del old["profile"]
    assert ClusterState.from_json(old).profile == "stock"


def test_kueue_webhooks_call_a_url_and_keep_only_what_this_kueue_serves() -> None:
    def webhook(name: str, path: str) -> dict[str, Any]:
        service = {"name": "webhook-service", "namespace": "system", "path": path}
        return {"name": name, "clientConfig": {"service": service}, "failurePolicy": "Fail"}

    listed = {
        "kind": "List",
        "items": [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "mutating-webhook-configuration"},
                "webhooks": [
                    webhook("mjob.kb.io", "/mutate-batch-v1-job"),
                    webhook("mpod.kb.io", "/mutate--v1-pod"),  # the pod integration is off: dropped
                    webhook("mworkload.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
                ],
            }
        ],
    }
    (configuration,) = localcluster.kueue_webhooks(listed, url="https://127.0.0.1:9443", ca_bundle="Q0E=")
    assert configuration["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
    assert [item["name"] for item in configuration["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert configuration["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job",
        "caBundle": "Q0E=",
    }
    assert configuration["webhooks"][0]["failurePolicy"] == "Fail"


def test_the_kueue_cluster_queue_quota_is_every_fake_node_together() -> None:
    state = ClusterState(
        state_dir="/nowhere", kubeconfig="/nowhere/kubeconfig", server="https://127.0.0.1:1",
        nodes=3, gpus_per_node=8,
    )  # fmt: skip
    queues = {body["kind"]: body for _, body in localcluster.kueue_queues(state)}
    (group,) = queues["ClusterQueue"]["spec"]["resourceGroups"]
    quota = {item["name"]: item["nominalQuota"] for item in group["flavors"][0]["resources"]}
    assert quota == {"cpu": "96", "memory": "768Gi", "nvidia.com/gpu": "24"}
    assert group["coveredResources"] == list(quota)
    assert queues["LocalQueue"]["spec"] == {"clusterQueue": localcluster.KUEUE_CLUSTER_QUEUE}
    assert queues["LocalQueue"]["metadata"]["namespace"] == "default"


def test_json_documents_splits_kubectls_output_for_a_multi_document_file() -> None:
    assert localcluster.json_documents('{"a": 1}\n{"b": [2]}\n') == [{"a": 1}, {"b": [2]}]
    assert localcluster.json_documents("  \n") == []
    with pytest.raises(json.JSONDecodeError):
        localcluster.json_documents('{"a": 1} {"b"')
