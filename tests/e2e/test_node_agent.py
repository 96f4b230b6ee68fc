"""The node agent against the real control plane: Jobs scheduled to its node really run.

Plain Jobs (no operator) exercise what the e2e run relies on: the scheduler binds to the agent's
node through nodeSelector + toleration, the process gets env from a Secret, the downward API and the
Job completion index, a ConfigMap volume and an emptyDir working directory, and the pod's phase,
exit code and termination message come back through the API. Deleting a running pod kills its
process and the pod goes away.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.agent_fixture import RunningAgent, node_agent

# Runs inside the pod: reports what it was given in the termination message, fails on request.
# (Paths reach it through env: the agent maps container paths in env, args and workingDir, not in code.)
SCRIPT = """
import json, os, pathlib, sys
config = json.loads(pathlib.Path(os.environ["SETTINGS"]).read_text())
pathlib.Path("out.txt").write_text("written in the working dir")
message = {
    "index": os.environ["JOB_INDEX"],
    "pod": os.environ["POD_NAME"],
    "secret": os.environ["TOKEN"],
    "setting": config["color"],
    "cwd_is_scratch": os.getcwd().endswith("/scratch") and pathlib.Path("out.txt").exists(),
    "no_aws": not any(key.startswith("AWS_") for key in os.environ),
}
pathlib.Path(os.environ["KUBEALIGN_TERMINATION_LOG"]).write_text(json.dumps(message))
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@pytest.fixture
def agent(cluster: Any, tmp_path: Path) -> Iterator[RunningAgent]:
    with node_agent(cluster.kubeconfig, tmp_path) as running:
        yield running


def _job(
    agent: RunningAgent,
    name: str,
    *,
    command: list[str],
    completions: int = 1,
    env: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": agent.node_selector,
                    "tolerations": agent.tolerations,
                    "containers": [
                        {
                            "name": "probe",
                            "image": "kubealign-trainer:test",
                            "command": command,
                            "workingDir": "/scratch",
                            "env": [
                                {
                                    "name": "TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": "probe", "key": "token"}},
                                },
                                {
                                    "name": "JOB_INDEX",
                                    "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}},
                                },
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                # A container path in env is mapped to the pod's copy of the volume.
                                {"name": "SETTINGS", "value": "/etc/probe/settings.json"},
                                *env,
                            ],
                            "volumeMounts": [
                                {"name": "settings", "mountPath": "/etc/probe", "readOnly": True},
                                {"name": "scratch", "mountPath": "/scratch"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "settings", "configMap": {"name": "probe"}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                }
            },
        },
    }


def _pods(core: Any, namespace: str, job: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items)


def _wait(what: str, predicate: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _finished_job(batch: Any, core: Any, namespace: str, name: str, agent: RunningAgent) -> Any:
    """Wait for the Job to complete or fail; a failure shows its pods' states and the agent's log."""

    def finished() -> Any:
        job = batch.read_namespaced_job_status(name, namespace)
        conditions = {c.type for c in job.status.conditions or [] if c.status == "True"}
        return job if conditions & {"Complete", "Failed"} else None

    job = _wait(f"job {name} to finish", finished, timeout=90)
    if not job.status.succeeded:
        states = [p.status.container_statuses for p in _pods(core, namespace, name)]
        raise AssertionError(f"job {name} failed: {states}\nagent log:\n{agent.log.read_text()}")
    return job


def _setup(core: Any, namespace: str) -> None:
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "probe"}, "stringData": {"token": "s3cr3t"}}
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "probe"}, "data": {"settings.json": json.dumps({"color": "teal"})}}
    )


def test_indexed_job_runs_on_the_agent_with_its_env_and_volumes(
    kube_api: Any, namespace: str, agent: RunningAgent
) -> None:
    core: Any = client.CoreV1Api(kube_api)
    batch: Any = client.BatchV1Api(kube_api)
    _setup(core, namespace)
    batch.create_namespaced_job(namespace, _job(agent, "ok", command=["python", "-c", SCRIPT], completions=2))
    job = _finished_job(batch, core, namespace, "ok", agent)
    assert (job.status.succeeded, job.status.failed) == (2, None)
    pods = _pods(core, namespace, "ok")
    assert {pod.spec.node_name for pod in pods} == {agent.node_name}
    messages = sorted(
        (
            (json.loads(pod.status.container_statuses[0].state.terminated.message), pod.metadata.name)
            for pod in pods
        ),
        key=lambda pair: str(pair[0]["index"]),
    )
    assert [(m["index"], m["pod"] == name) for m, name in messages] == [("0", True), ("1", True)]
    for message, _ in messages:
        assert message["secret"] == "s3cr3t"
        assert message["setting"] == "teal"
        assert message["cwd_is_scratch"] is True
        assert message["no_aws"] is True
    for pod in pods:
        terminated = pod.status.container_statuses[0].state.terminated
        assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Succeeded", 0, "Completed")
        assert pod.status.pod_ip == "127.0.0.1"


def test_failure_reports_exit_code_and_message(kube_api: Any, namespace: str, agent: RunningAgent) -> None:
    core: Any = client.CoreV1Api(kube_api)
    batch: Any = client.BatchV1Api(kube_api)
    _setup(core, namespace)
    failing = _job(agent, "bad", command=["python", "-c", SCRIPT], env=({"name": "EXIT_CODE", "value": "3"},))
    batch.create_namespaced_job(namespace, failing)
    pod = _wait(
        "pod of job bad to fail",
        lambda: next((p for p in _pods(core, namespace, "bad") if p.status.phase == "Failed"), None),
    )
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert json.loads(terminated.message)["secret"] == "s3cr3t"


def test_deleting_a_running_pod_kills_its_process(kube_api: Any, namespace: str, agent: RunningAgent) -> None:
    core: Any = client.CoreV1Api(kube_api)
    batch: Any = client.BatchV1Api(kube_api)
    _setup(core, namespace)
    marker = agent.work_dir.parent / "still-running"
    sleeper = (
        f"import pathlib, time\nwhile True:\n    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(0.1)\n"
    )
    batch.create_namespaced_job(namespace, _job(agent, "sleepy", command=["python", "-c", sleeper]))
    pod = _wait(
        "pod of job sleepy to run",
        lambda: next((p for p in _pods(core, namespace, "sleepy") if p.status.phase == "Running"), None),
    )
    _wait("the process to start", marker.exists)
    batch.delete_namespaced_job("sleepy", namespace, propagation_policy="Foreground")
    _wait("the pod to be gone", lambda: not _pods(core, namespace, "sleepy"), timeout=60)
    marker.unlink()
    time.sleep(0.5)
    assert not marker.exists(), f"pod {pod.metadata.name}'s process survived its deletion"
