"""Pure parts of the local runner: progress parsing and formatting, localizing a run, manifest
errors, the interrupted status. No processes, no training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubealign import api, plan
from kubealign.local import (
    ManifestError,
    interrupted_status,
    load_manifest,
    localize,
    missing_inputs,
    result_metrics,
    with_tracking,
)
from kubealign.progress import (
    Progress,
    StageView,
    eta_seconds,
    format_duration,
    metrics_table,
    parse_record,
    progress_line,
)

MANIFEST = """\
apiVersion: kubealign.io/v1alpha1
kind: AlignmentRun
metadata:
  name: tiny
spec:
  image: kubealign/trainer:dev
  storage:
    uri: {storage}
  stages:
  - name: pretrain
    type: pretrain
    inputs:
      data: {{uri: "file://./corpus.txt"}}
  - name: sft
    type: sft
    inputs:
      model: {{from: {model_from}}}
      data: {{uri: "file:///abs/sft.jsonl"}}
"""


def write_manifest(
    tmp_path: Path, *, storage: str = "file:///var/kubealign", model_from: str = "pretrain"
) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(MANIFEST.format(storage=storage, model_from=model_from))
    return path


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"stage": "sft", "step": 3, "total_steps": 10, "loss": 2.5}\n', (3, 10, "loss", 2.5)),
        ('{"step": 7, "loss": 1, "score": 0.5}', (7, None, "loss", 1.0)),
        ('{"step": 2, "total_steps": 40, "score": 0.25, "kl": 0.1}', (2, 40, "score", 0.25)),
        ('{"step": 7, "total_steps": 0, "loss": "nan?"}', (7, None, None, None)),
    ],
)
def test_progress_from_trainer_lines(
    line: str, expected: tuple[int, int | None, str | None, float | None]
) -> None:
    record = parse_record(line)
    assert record is not None
    progress = Progress.from_record(record, at=1.0)
    assert (progress.step, progress.total_steps, progress.metric, progress.value) == expected


@pytest.mark.parametrize("line", ["", "Traceback (most recent call last):", "{not json", "[1, 2]", "  "])
def test_non_records_are_ignored(line: str) -> None:
    assert parse_record(line) is None


def test_eta_uses_the_rate_since_the_attempts_first_line() -> None:
    # A resumed attempt starts at step 50: 10 steps in 5 s leaves 40 steps, 20 s.
    first = Progress(step=50, total_steps=100, metric=None, value=None, at=100.0)
    latest = Progress(step=60, total_steps=100, metric="loss", value=1.0, at=105.0)
    assert eta_seconds(first, latest) == pytest.approx(20.0)
    assert eta_seconds(latest, latest) is None
    assert eta_seconds(first, Progress(step=60, total_steps=None, metric="loss", value=1.0, at=105.0)) is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "--:--"), (0, "00:00"), (75.4, "01:15"), (3725, "1:02:05")]
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_progress_line_shows_bar_steps_loss_and_eta() -> None:
    view = StageView(
        name="sft",
        type="sft",
        phase="Running",
        attempts=1,
        elapsed_s=5.0,
        first=Progress(step=0, total_steps=200, metric=None, value=None, at=0.0),
        latest=Progress(step=50, total_steps=200, metric="loss", value=2.31415, at=10.0),
    )
    line = progress_line(view, name_width=5)
    assert line.startswith("sft    [######------------------]  25%")
    assert "50/200" in line and "loss 2.3142" in line and "ETA 00:30" in line


def test_metrics_table_names_each_stage_once() -> None:
    lines = metrics_table({"sft": {"loss": 1.23456, "steps": 10}, "dpo": {"reward_accuracy": 0.9}})
    assert lines[0].split() == ["STAGE", "METRIC", "VALUE"]
    assert [line.split() for line in lines[1:]] == [
        ["sft", "loss", "1.235"],
        ["steps", "10"],
        ["dpo", "reward_accuracy", "0.9"],
    ]


def test_result_metrics_keep_scalars_only() -> None:
    status = api.RunStatus(
        stages=(
            api.StageStatus(
                name="eval",
                type="evaluate",
                phase=api.StagePhase.SUCCEEDED,
                metrics={"status": "succeeded", "stage": "eval", "win_rate": 0.7, "policies": {"a": 1}},
            ),
            api.StageStatus(name="sft", type="sft", phase=api.StagePhase.PENDING),
        )
    )
    assert result_metrics(status) == {"eval": {"win_rate": 0.7}}


def test_localize_puts_file_storage_under_the_workdir_and_resolves_relative_inputs(tmp_path: Path) -> None:
    manifest, _ = load_manifest(write_manifest(tmp_path))
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=tmp_path, workdir=tmp_path / "work")
    assert run.spec.storage.uri == (tmp_path / "work" / "storage").as_uri()
    pretrain, sft = run.spec.stages
    assert pretrain.inputs.data is not None and pretrain.inputs.data.uri == (tmp_path / "corpus.txt").as_uri()
    assert sft.inputs.data is not None and sft.inputs.data.uri == "file:///abs/sft.jsonl"
    assert sft.inputs.model is not None and sft.inputs.model.from_stage == "pretrain"


def test_localize_keeps_s3_storage(tmp_path: Path) -> None:
    manifest, _ = load_manifest(write_manifest(tmp_path, storage="s3://bucket/prefix"))
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=tmp_path, workdir=tmp_path / "work")
    assert run.spec.storage.uri == "s3://bucket/prefix"


def test_missing_file_inputs_are_named_with_file_and_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path)
    manifest, document = load_manifest(path)
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=tmp_path, workdir=tmp_path / "work")
    (tmp_path / "corpus.txt").write_text("hello\n")
    assert missing_inputs(run, document, path) == [
        f"{path}:18: spec.stages[1].inputs.data.uri: /abs/sft.jsonl does not exist"
    ]


def test_invalid_manifest_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, model_from="sft2")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (error,) = caught.value.errors
    assert error.startswith(f"{path}:17: spec.stages[1].inputs.model.from: ")
    assert "must name a stage listed earlier" in error


def test_a_file_without_a_run_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ManifestError, match="expected exactly one AlignmentRun document, found 0"):
        load_manifest(path)


def test_interrupted_status_fails_the_run_and_the_stopped_stage(tmp_path: Path) -> None:
    manifest, _ = load_manifest(write_manifest(tmp_path))
    run = api.AlignmentRun.from_manifest(manifest)
    jobs = [
        plan.ObservedJob(
            "tiny-pretrain-1", "pretrain", 1, plan.JobState.SUCCEEDED, "t0", "t1", "", {"loss": 1.0}
        ),
        plan.ObservedJob("tiny-sft-1", "sft", 1, plan.JobState.FAILED, "t1", "t2", "interrupted by SIGINT"),
    ]
    status = plan.summarize(run, jobs, None, (), "2024-01-01T00:00:00Z")
    stopped = interrupted_status(status, {"sft": "tiny-sft-1"}, "SIGINT")
    assert stopped.phase == "Failed"
    pretrain, sft = stopped.stages
    assert pretrain.phase == "Succeeded" and pretrain.metrics == {"loss": 1.0}
    assert sft.phase == "Failed" and "interrupted by SIGINT" in sft.message
    failed = stopped.condition("Failed")
    assert failed is not None and (failed.status, failed.reason) == ("True", "Interrupted")


def test_the_runner_never_imports_torch() -> None:
    """The local runner lives in the operator package: it spawns trainers, it does not train."""
    code = (
        "import sys; import kubealign.cli, kubealign.local; "
        "kubealign.local.artifact_complete('file:///nonexistent/artifact'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("judge", "expected"),
    [
        ({"model": {"uri": "file://./judge.gguf"}}, "RELATIVE"),
        ({"model": {"uri": "file:///abs/judge"}}, "file:///abs/judge"),
        ({"endpoint": "http://v/v1", "model": "served"}, None),
    ],
)
def test_localize_resolves_an_in_pod_judge_relative_to_the_manifest(
    tmp_path: Path, judge: dict[str, Any], expected: str | None
) -> None:
    manifest, _ = load_manifest(write_manifest(tmp_path))
    manifest["spec"]["stages"][1]["hyperparameters"] = {"judge": judge}
    run = localize(api.AlignmentRun.from_manifest(manifest), manifest_dir=tmp_path, workdir=tmp_path / "work")
    located = run.spec.stages[1].hyperparameters["judge"]
    if expected is None:
        assert located == judge
    else:
        want = (tmp_path / "judge.gguf").as_uri() if expected == "RELATIVE" else expected
        assert located["model"] == {"uri": want}


@pytest.mark.parametrize(
    ("option", "spec", "expected"),
    [
        (None, None, "sqlite:///WORKDIR/mlflow.db"),
        (None, {"uri": "http://mlflow:5000"}, "http://mlflow:5000"),
        ("http://127.0.0.1:5000", {"uri": "http://mlflow:5000", "experiment": "x"}, "http://127.0.0.1:5000"),
        ("off", {"uri": "http://mlflow:5000"}, None),
    ],
)
def test_local_tracking_prefers_the_option_then_the_spec_then_the_workdir(
    tmp_path: Path, option: str | None, spec: dict[str, Any] | None, expected: str | None
) -> None:
    manifest, _ = load_manifest(write_manifest(tmp_path))
    if spec is not None:
        manifest["spec"]["tracking"] = {"mlflow": spec}
    workdir = tmp_path / "work"
    run = with_tracking(api.AlignmentRun.from_manifest(manifest), option, workdir)
    uri = None if run.spec.mlflow is None else run.spec.mlflow.uri
    assert uri == (None if expected is None else expected.replace("WORKDIR", str(workdir.resolve())))
    if spec and option != "off":
        assert run.spec.mlflow is not None and run.spec.mlflow.experiment == spec.get(
            "experiment", "kubealign"
        )
    if option != "off":  # the run's identity in the tracker is kept in the workdir: a rerun continues
        again = with_tracking(api.AlignmentRun.from_manifest(manifest), option, workdir)
        assert run.uid.startswith("local-") and again.uid == run.uid
