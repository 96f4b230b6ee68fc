"""Start and stop tests/e2e/node_agent.py as a subprocess: the one real node of an e2e test."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.processes import serving

AGENT = Path(__file__).resolve().parent / "node_agent.py"
AGENT_ID_LABEL = "kubealign.io/node-agent-id"
AGENT_TAINT = "kubealign.io/node-agent"


@dataclass(frozen=True)
class RunningAgent:
    """A registered node; pods reach it with ``node_selector`` and ``tolerations``."""

    node_name: str
    agent_id: str
    work_dir: Path
    log: Path

    @property
    def node_selector(self) -> dict[str, str]:
        return {AGENT_ID_LABEL: self.agent_id}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        return [{"key": AGENT_TAINT, "operator": "Equal", "value": "true", "effect": "NoSchedule"}]

    def pod_logs(self) -> str:
        """Every pod's container log, for failure messages."""
        parts = [
            f"--- {path.parent.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.work_dir.glob("*/container.log"))
        ]
        return "\n".join(parts)


@contextlib.contextmanager
def node_agent(kubeconfig: str, base_dir: Path, *extra_args: str) -> Iterator[RunningAgent]:
    """Run the agent until the block ends; the Node is registered before the block starts.

    The node is tainted so that no other test's pods land on it, and labelled with a fresh id so
    that this block's pods land only on it (never on a node a crashed earlier session left behind).
    """
    agent_id = secrets.token_hex(4)
    agent = RunningAgent(
        node_name=f"kubealign-agent-{agent_id}",
        agent_id=agent_id,
        work_dir=base_dir / "pods",
        log=base_dir / "node-agent.log",
    )
    command = [
        sys.executable,
        str(AGENT),
        f"--kubeconfig={kubeconfig}",
        f"--node-name={agent.node_name}",
        f"--work-dir={agent.work_dir}",
        f"--label={AGENT_ID_LABEL}={agent_id}",
        f"--taint={AGENT_TAINT}=true:NoSchedule",
        *extra_args,
    ]
    # The agent's own environment carries nothing to the pods, but it must not hold S3 credentials
    # either: whatever the pods get, they get from their spec.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    with agent.log.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    with serving(
        process,
        ready=lambda: f"node-agent ready {agent.node_name}" in agent.log.read_text(),
        what="node agent",
        log=agent.log,
        start_timeout=60,
        stop_timeout=30,
    ):
        yield agent
