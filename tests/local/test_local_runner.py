"""``kubealign run MANIFEST --local`` end to end, with real (tiny) training stages as subprocesses.

- a DAG with parallel branches completes; status.json matches the CRD's status schema;
- a rerun skips finished stages without starting a trainer;
- a killed runner takes its stage down with it, and the rerun resumes that stage from its
  checkpoint; Ctrl-C then stops it cleanly, keeping what was published;
- a failing stage is retried up to maxRetries, then fails the run with the trainer's error;
- an invalid manifest fails before anything runs, naming file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kubealign import api
from tests.local.runner_toys import Workspace, kubealign, sft_stage

BASE = {"uri": "file://./base"}
RUN_TIMEOUT_S = 300


def closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The CRD's structural schema as JSON Schema: objects with declared properties allow no others
    (as the API server prunes unknown fields), unless they preserve unknown fields."""
    out: dict[str, Any] = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {name: closed(child) for name, child in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = closed(schema["items"])
    return out


def status_schema() -> dict[str, Any]:
    return closed(api.openapi_schema()["properties"]["status"])


def run_cli(*args: str | Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kubealign(*args), capture_output=True, text=True, timeout=timeout, check=False)


def last_attempt_steps(log: Path) -> list[int]:
    """The training steps the stage's latest attempt logged (the runner heads each attempt with ===)."""
    latest = log.read_text().split("\n=== ")[-1]
    records = [json.loads(line) for line in latest.splitlines() if line.startswith("{")]
    return [r["step"] for r in records if "event" not in r and "step" in r]


def lines_of(process: subprocess.Popen[str]) -> Iterator[str]:
    assert process.stdout is not None
    yield from iter(process.stdout.readline, "")


def wait_for(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def processes_with(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def finished_run(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """first -> (left, right): the two branches read the same stage and may run side by side."""
    manifest = workspace.manifest(
        "dag",
        [
            sft_stage("first", model=BASE, steps=3),
            sft_stage("left", model={"from": "first"}, steps=2),
            sft_stage("right", model={"from": "first"}, steps=2),
        ],
    )
    workdir = tmp_path_factory.mktemp("dag-work")
    result = run_cli("run", manifest, "--local", "--workdir", workdir, "--max-parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return manifest, workdir, result.stdout


def test_full_dag_completes(finished_run: tuple[Path, Path, str]) -> None:
    _, workdir, stdout = finished_run
    status = json.loads((workdir / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["progress"] == "3/3"
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded" and stage["attempts"] == 1
        artifact = Path(stage["output"].removeprefix("file://"))
        assert artifact == workdir / "storage" / "default" / "dag" / stage["name"] / "artifact"
        assert (artifact / "_MANIFEST.json").is_file() and (artifact / "config.json").is_file()
        assert stage["metrics"]["steps"] == {"first": 3, "left": 2, "right": 2}[stage["name"]]
        # Inputs are read-only: "first" was read by both branches, and its artifact is still exactly
        # what it published (no cache or lock file beside it, every file as its manifest says).
        listed = json.loads((artifact / "_MANIFEST.json").read_text())["files"]
        present = {str(p.relative_to(artifact)) for p in artifact.rglob("*") if p.is_file()}
        assert present == {entry["path"] for entry in listed} | {"_MANIFEST.json"}, stage["name"]
        for entry in listed:
            digest = hashlib.sha256((artifact / entry["path"]).read_bytes()).hexdigest()
            assert digest == entry["sha256"], f"{stage['name']}: {entry['path']} changed after publishing"
    # The two branches started as soon as "first" succeeded, before either of them finished.
    order = [line for line in stdout.splitlines() if re.match(r"^(left|right): (Running|Succeeded)", line)]
    assert [line.split(":")[1].split(",")[0].strip().split()[0] for line in order[:2]] == [
        "Running",
        "Running",
    ]
    # The closing tables: every stage and its metrics.
    assert re.search(r"^left\s+sft\s+Succeeded\s+1", stdout, re.M)
    assert re.search(r"^first\s+examples\s+32", stdout, re.M)
    # Each stage got the config document the operator would mount, with storage under the workdir.
    config = json.loads((workdir / "configs" / "left.json").read_text())
    assert config["inputs"]["model"] == (workdir / "storage/default/dag/first/artifact").as_uri()
    assert config["resume"] == (workdir / "storage/default/dag/left/checkpoints").as_uri()


def test_status_matches_the_crd_status_schema(finished_run: tuple[Path, Path, str]) -> None:
    _, workdir, _ = finished_run
    status = json.loads((workdir / "status.json").read_text())
    jsonschema.validate(status, status_schema())
    # And the check has teeth: a misnamed field or a wrong type is rejected.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**status, "stageStatuses": []}, status_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**status, "stages": [{"name": "x", "attempts": "one"}]}, status_schema())


def test_rerun_skips_finished_stages(finished_run: tuple[Path, Path, str]) -> None:
    manifest, workdir, _ = finished_run
    logs = {log.name: log.stat().st_size for log in (workdir / "logs").glob("*.log")}
    before = json.loads((workdir / "status.json").read_text())
    result = run_cli("run", manifest, "--local", "--workdir", workdir, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("first", "left", "right"):
        assert f"{name}: artifact complete, skipped" in result.stdout
    # No trainer ran: its log would have grown by an attempt header at least.
    assert {log.name: log.stat().st_size for log in (workdir / "logs").glob("*.log")} == logs
    after = json.loads((workdir / "status.json").read_text())
    assert [(s["name"], s["jobName"], s["metrics"]) for s in after["stages"]] == [
        (s["name"], s["jobName"], s["metrics"]) for s in before["stages"]
    ]


def test_killed_run_resumes_from_its_checkpoint_and_ctrl_c_stops_cleanly(
    workspace: Workspace, tmp_path: Path
) -> None:
    manifest = workspace.manifest(
        "resumable", [sft_stage("long", model=BASE, steps=100000, checkpoint_every=3, keep_checkpoints=2)]
    )
    workdir = tmp_path / "work"
    checkpoints = workdir / "storage/default/resumable/long/checkpoints"
    config = str(workdir / "configs" / "long.json")
    command = [*kubealign("run", manifest, "--local", "--workdir", workdir, "--plain")]

    # 1. The runner dies hard (SIGKILL) mid-stage, after a checkpoint was published.
    runner = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: any(checkpoints.glob("step-*/_MANIFEST.json")), timeout=120, what="a checkpoint")
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
    finally:
        if runner.poll() is None:
            runner.kill()
    # The kernel takes the orphaned trainer down with its runner (PR_SET_PDEATHSIG).
    wait_for(lambda: not processes_with(config), timeout=30, what="the trainer to exit")
    saved = sorted(
        int(p.parent.name.removeprefix("step-")) for p in checkpoints.glob("step-*/_MANIFEST.json")
    )
    assert saved

    # 2. The rerun resumes the stage from its newest checkpoint: the step count continues.
    rerun = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        resumed = next((line for line in lines_of(rerun) if "resumed from step" in line), "")
        step = int(re.search(r"resumed from step (\d+)", resumed).group(1))  # type: ignore[union-attr]
        assert step >= saved[-1]
        log = workdir / "logs" / "long.log"
        wait_for(lambda: bool(last_attempt_steps(log)), timeout=60, what="a training step after the resume")
        # 3. Ctrl-C: the runner stops the stage and records the interruption.
        os.kill(rerun.pid, signal.SIGINT)
        output, _ = rerun.communicate(timeout=60)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 130, output
    assert last_attempt_steps(log)[0] == step + 1

    status = json.loads((workdir / "status.json").read_text())
    jsonschema.validate(status, status_schema())
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "Interrupted")
    (long,) = status["stages"]
    assert long["phase"] == "Failed" and "interrupted by SIGINT" in long["message"]
    # Nothing published was lost: the checkpoints are complete and still there.
    assert any(checkpoints.glob("step-*/_MANIFEST.json"))
    assert not processes_with(config)


def test_failing_stage_is_retried_then_fails_the_run(workspace: Workspace, tmp_path: Path) -> None:
    # Valid for the catalogue, refused by the trainer: 3 does not divide the batch of 4.
    stage = sft_stage("broken", model=BASE, steps=2, micro_batch_size=3)
    manifest = workspace.manifest("failing", [{**stage, "maxRetries": 1}])
    result = run_cli("run", manifest, "--local", "--workdir", tmp_path / "work")
    assert result.returncode == 1, result.stdout + result.stderr
    status = json.loads((tmp_path / "work" / "status.json").read_text())
    (broken,) = status["stages"]
    assert broken["phase"] == "Failed" and broken["attempts"] == 2
    assert broken["jobName"] == "failing-broken-2"
    assert "exit code 2" in broken["message"] and "hyperparameters.micro_batch_size" in broken["message"]
    assert "hyperparameters.micro_batch_size" in result.stdout
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "StageFailed")
    assert (tmp_path / "work" / "logs" / "broken.log").read_text().count("=== ") == 2


def test_a_bad_hyperparameter_is_refused_before_any_stage_starts(
    workspace: Workspace, tmp_path: Path
) -> None:
    first = sft_stage("first", model=BASE, steps=1)
    second = sft_stage("second", model={"from": "first"}, steps=1, max_step=2)
    manifest = workspace.manifest("refused", [first, second])
    result = run_cli("run", manifest, "--local", "--workdir", tmp_path / "work")
    assert result.returncode != 0
    assert "spec.stages[1].hyperparameters.max_step" in result.stderr
    assert "did you mean max_steps?" in result.stderr
    # Nothing ran: no stage log, no status.
    assert not (tmp_path / "work" / "logs").exists()
    assert not (tmp_path / "work" / "status.json").exists()


def test_s3_storage_holds_the_artifacts_and_a_rerun_skips_them(
    workspace: Workspace, s3: Any, bucket: str, tmp_path: Path
) -> None:
    """With s3:// storage the stages publish to the bucket (the moto server from the environment)."""
    manifest = workspace.manifest(
        "on-s3", [sft_stage("only", model=BASE, steps=2)], storage=f"s3://{bucket}/runs"
    )
    workdir = tmp_path / "work"
    result = run_cli("run", manifest, "--local", "--workdir", workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"runs/default/on-s3/only/artifact/_MANIFEST.json", "runs/default/on-s3/only/metrics.json"} <= keys
    assert not (workdir / "storage").exists()
    (only,) = json.loads((workdir / "status.json").read_text())["stages"]
    assert only["output"] == f"s3://{bucket}/runs/default/on-s3/only/artifact"

    rerun = run_cli("run", manifest, "--local", "--workdir", workdir, timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "only: artifact complete, skipped" in rerun.stdout


def test_invalid_manifest_fails_with_the_field_named(workspace: Workspace, tmp_path: Path) -> None:
    manifest = workspace.manifest(
        "invalid",
        [sft_stage("sft", model=BASE, steps=1), sft_stage("sft-b", model={"from": "sft2"}, steps=1)],
    )
    result = run_cli("run", manifest, "--local", "--workdir", tmp_path / "work", timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[0]
    assert re.match(rf"^{re.escape(str(manifest))}:\d+: spec\.stages\[1\]\.inputs\.model\.from: ", line), line
    assert not (tmp_path / "work" / "status.json").exists()


def test_a_sweep_runs_each_member_within_max_parallel_and_readers_fan_out(
    workspace: Workspace, tmp_path: Path
) -> None:
    manifest = workspace.manifest(
        "swept",
        [
            {**sft_stage("tune", model=BASE, steps=2), "sweep": {"seed": [1, 2]}, "maxParallel": 1},
            sft_stage("after", model={"from": "tune"}, steps=1),
        ],
    )
    result = run_cli("run", manifest, "--local", "--workdir", tmp_path, "--max-parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    jsonschema.validate(status, status_schema())
    assert status["progress"] == "4/4"
    assert [(s["name"], s["sweep"]) for s in status["stages"]] == [
        ("tune-seed-1", {"stage": "tune", "values": {"seed": 1}}),
        ("tune-seed-2", {"stage": "tune", "values": {"seed": 2}}),
        ("after-seed-1", {"stage": "after", "values": {"seed": 1}}),
        ("after-seed-2", {"stage": "after", "values": {"seed": 2}}),
    ]
    for name, seed, model in (("tune-seed-2", 2, None), ("after-seed-2", 2, "tune-seed-2")):
        config = json.loads((tmp_path / "configs" / f"{name}.json").read_text())
        assert config["seed"] == seed
        if model:
            assert (
                config["inputs"]["model"] == (tmp_path / f"storage/default/swept/{model}/artifact").as_uri()
            )
    # maxParallel 1: the second member started only after the first finished.
    events = [
        re.sub(r" after .*", "", line.split(",")[0])
        for line in result.stdout.splitlines()
        if re.match(r"^tune-seed-\d: (Running|Succeeded)", line)
    ]
    assert events == [
        "tune-seed-1: Running",
        "tune-seed-1: Succeeded",
        "tune-seed-2: Running",
        "tune-seed-2: Succeeded",
    ]
