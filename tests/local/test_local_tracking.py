"""``kubealign run --local`` and MLflow: a sqlite store in the workdir by default, or a real
``mlflow server`` on 127.0.0.1 with ``--mlflow``; one parent run per AlignmentRun, a child per stage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from kubealign.local import MLFLOW_DB, MLFLOW_ENV, RUN_UID_FILE
from tests.conftest import MlflowServer
from tests.local.runner_toys import Workspace, kubealign, sft_stage

BASE = {"uri": "file://./base"}


def run_local(
    manifest: Path, workdir: Path, *args: str, tracking: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if tracking:
        env.pop(MLFLOW_ENV, None)  # tests/conftest.py turns tracking off for the other local tests
    return subprocess.run(
        kubealign("run", manifest, "--local", "--workdir", workdir, *args),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def runs_by_kind(client: Any, uid: str) -> dict[str, list[Any]]:
    experiment = client.get_experiment_by_name("kubealign")
    found: dict[str, list[Any]] = {"run": [], "stage": []}
    for run in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`kubealign.run_uid` = '{uid}'"
    ):
        found[run.data.tags["kubealign.kind"]].append(run)
    return found


def test_a_local_run_tracks_into_a_sqlite_store_in_its_workdir(workspace: Workspace, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    manifest = workspace.manifest(
        "tracked",
        [sft_stage("first", model=BASE, steps=4), sft_stage("second", model={"from": "first"}, steps=3)],
    )
    workdir = tmp_path / "work"
    result = run_local(manifest, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    uid = (workdir / RUN_UID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / MLFLOW_DB}")
    runs = runs_by_kind(client, uid)
    (parent,) = runs["run"]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    children = {run.info.run_name: run for run in runs["stage"]}
    assert sorted(children) == ["first", "second"]
    for name, steps in (("first", 4), ("second", 3)):
        child = children[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["kubealign.job"] == f"tracked-{name}-1"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(
            range(1, steps + 1)
        )
        assert child.data.params["max_steps"] == str(steps)

    # A rerun skips the finished stages and starts no MLflow runs; --mlflow off logs nowhere.
    again = run_local(manifest, workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [len(v) for v in runs_by_kind(client, uid).values()] == [1, 2]
    off = tmp_path / "off"
    assert run_local(manifest, off, "--mlflow", "off").returncode == 0
    assert not (off / MLFLOW_DB).exists()


def test_a_local_run_logs_to_an_mlflow_server(
    workspace: Workspace, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    manifest = workspace.manifest("served", [sft_stage("only", model=BASE, steps=3, checkpoint_every=2)])
    workdir = tmp_path / "work"
    result = run_local(manifest, workdir, "--mlflow", mlflow_server.uri)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (workdir / MLFLOW_DB).exists()
    client = mlflow_server.client()
    runs = runs_by_kind(client, (workdir / RUN_UID_FILE).read_text().strip())
    (parent,), (child,) = runs["run"], runs["stage"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "lr")] == [1, 2, 3]
