"""The node agent's pure pieces: what a kubelet would compute from a pod spec, without a cluster."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.node_agent import (
    AgentSettings,
    PathMap,
    PodSpecError,
    expand,
    field_value,
    map_command,
    node_manifest,
    resolve_env,
    resource_value,
    termination_message,
)

POD: dict[str, Any] = {
    "metadata": {
        "name": "run-sft-0-abcde",
        "namespace": "team-a",
        "uid": "1234",
        "labels": {"kubealign.io/stage": "sft"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "2"},
    },
    "spec": {"nodeName": "agent-0", "serviceAccountName": "default"},
}
SECRETS = {("team-a", "s3"): {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}}
CONFIG_MAPS = {("team-a", "settings"): {"LOG_LEVEL": "debug", "MODE": "fast"}}


def _secret(namespace: str, name: str) -> Mapping[str, str] | None:
    return SECRETS.get((namespace, name))


def _config_map(namespace: str, name: str) -> Mapping[str, str] | None:
    return CONFIG_MAPS.get((namespace, name))


def _env(container: dict[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    return resolve_env(POD, container, base=base or {}, secret=_secret, config_map=_config_map)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$(A)$(B)", "12"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("cost: $5", "cost: $5"),
        ("$(A", "$(A"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "2"}) == expected


def test_env_resolves_every_source_in_order() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {
                "name": "STAGE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['kubealign.io/stage']"}},
            },
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LOG_LEVEL"}}},
            {
                "name": "OPTIONAL",
                "valueFrom": {"secretKeyRef": {"name": "gone", "key": "x", "optional": True}},
            },
            {"name": "ADDR", "value": "$(POD).svc:$(PORT)"},
            {"name": "PORT", "value": "29500"},
        ],
    }
    env = _env(container, base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "CFG_LOG_LEVEL": "debug",
        "CFG_MODE": "fast",
        "RANK": "2",
        "POD": "run-sft-0-abcde",
        "NS": "team-a",
        "STAGE": "sft",
        "KEY": "id",
        "LEVEL": "debug",
        # PORT is defined after ADDR, so (as in Kubernetes) it is not yet known when ADDR expands.
        "ADDR": "run-sft-0-abcde.svc:$(PORT)",
        "PORT": "29500",
    }


COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ([{"name": "K", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "x"}}}], "env[0] (K)"),
        (
            [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "nope"}}}],
            "env[0] (K).valueFrom.secretKeyRef: s3/nope not found",
        ),
        (
            [{"name": "K", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}],
            "env[0] (K).valueFrom.fieldRef.fieldPath: 'spec.hostname'",
        ),
        ([{"name": "K", "valueFrom": {"wat": {}}}], "env[0] (K).valueFrom.['wat']: unsupported source"),
    ],
)
def test_env_errors_name_the_field(env: list[dict[str, Any]], fragment: str) -> None:
    with pytest.raises(PodSpecError, match=re.escape(fragment)):
        _env({"env": env})


def test_env_from_missing_object_is_an_error_unless_optional() -> None:
    with pytest.raises(PodSpecError, match=r"envFrom\[0\].secretRef"):
        _env({"envFrom": [{"secretRef": {"name": "gone"}}]})
    assert _env({"envFrom": [{"secretRef": {"name": "gone", "optional": True}}]}) == {}


@pytest.mark.parametrize(
    ("resources", "ref", "expected"),
    [
        ({"limits": {"cpu": "1500m"}}, {"resource": "limits.cpu"}, "2"),
        ({"requests": {"cpu": "250m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "250"),
        ({"limits": {"memory": "2Gi"}}, {"resource": "limits.memory", "divisor": "1Mi"}, "2048"),
        ({"limits": {"nvidia.com/gpu": "4"}}, {"resource": "limits.nvidia.com/gpu"}, "4"),
    ],
)
def test_resource_field_ref(resources: dict[str, Any], ref: dict[str, str], expected: str) -> None:
    assert resource_value({"resources": resources}, ref) == expected


def test_field_value_subscripts_missing_keys_as_empty() -> None:
    assert field_value(POD, "metadata.annotations['absent']") == ""
    assert field_value(POD, "status.podIP") == "127.0.0.1"


def test_path_map_longest_prefix_wins_and_rewrites_flags() -> None:
    paths = PathMap().with_mount("/etc/kubealign", "/h/cfg").with_mount("/scratch", "/h/s")
    paths = paths.with_mount("/scratch/cache", "/h/c")
    assert paths.rewrite("/etc/kubealign/stage.json") == "/h/cfg/stage.json"
    assert paths.rewrite("/scratch/cache/x") == "/h/c/x"
    assert paths.rewrite("/scratch") == "/h/s"
    assert paths.rewrite("--config=/etc/kubealign/stage.json") == "--config=/h/cfg/stage.json"
    # Only whole path components match: /scratchpad is not under /scratch.
    assert paths.rewrite("/scratchpad") == "/scratchpad"
    assert paths.rewrite("s3://bucket/scratch") == "s3://bucket/scratch"
    assert paths.host("/elsewhere") is None


def test_map_command_uses_the_venv(tmp_path: Path) -> None:
    for name in ("python", "torchrun"):
        (tmp_path / name).touch()
    assert map_command(["python", "-m", "x"], venv_bin=tmp_path) == [str(tmp_path / "python"), "-m", "x"]
    assert map_command(["/usr/bin/python3.11", "-c", "1"], venv_bin=tmp_path)[0] == str(tmp_path / "python")
    assert map_command(["torchrun", "--nnodes=2"], venv_bin=tmp_path)[0] == str(tmp_path / "torchrun")
    assert map_command(["/bin/sh", "-c", "true"], venv_bin=tmp_path) == ["/bin/sh", "-c", "true"]
    with pytest.raises(PodSpecError, match="command: empty"):
        map_command([], venv_bin=tmp_path)
    with pytest.raises(PodSpecError, match="does not exist"):
        map_command(["accelerate", "launch"], venv_bin=tmp_path)


@pytest.mark.parametrize(
    "case",
    [
        ('{"loss": 1.0}', "noise", 0, "FallbackToLogsOnError", '{"loss": 1.0}'),
        ("", "line1\nboom", 1, "FallbackToLogsOnError", "line1\nboom"),
        ("", "line1\nboom", 1, "File", ""),
        ("", "fine", 0, "FallbackToLogsOnError", ""),
        ("x" * 5000, "", 0, "File", "x" * 4096),
    ],
)
def test_termination_message(tmp_path: Path, case: tuple[str, str, int, str, str]) -> None:
    written, log, exit_code, policy, expected = case
    message_file, log_file = tmp_path / "msg", tmp_path / "log"
    message_file.write_text(written)
    log_file.write_text(log)
    found = termination_message(
        message_file=message_file, log_file=log_file, exit_code=exit_code, policy=policy
    )
    assert found == expected


def test_node_manifest_advertises_gpus_and_is_not_kwoks(tmp_path: Path) -> None:
    settings = AgentSettings(
        node_name="agent-0",
        work_dir=tmp_path,
        venv_bin=tmp_path,
        labels={"pool": "e2e"},
        taints=(("kubealign.io/node-agent", "true", "NoSchedule"),),
        gpus=2,
    )
    node = node_manifest(settings)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert node["metadata"]["labels"]["kubealign.io/node-agent"] == "true"
    assert node["metadata"]["labels"]["pool"] == "e2e"
    assert not any(key.startswith("kwok.x-k8s.io") for key in node["metadata"].get("annotations", {}))
    assert [c["type"] for c in node["status"]["conditions"] if c["status"] == "True"] == ["Ready"]
    assert node["spec"]["taints"] == [
        {"key": "kubealign.io/node-agent", "value": "true", "effect": "NoSchedule"}
    ]
