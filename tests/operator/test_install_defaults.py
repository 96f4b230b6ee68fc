"""Install-wide defaults (trainer image, storage) fill only what a run's spec leaves out."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign import api
from kubealign.defaults import (
    ENV_ENDPOINT,
    ENV_IMAGE,
    ENV_MLFLOW_EXPERIMENT,
    ENV_MLFLOW_SECRET,
    ENV_MLFLOW_URI,
    ENV_QUEUE_NAME,
    ENV_REGION,
    ENV_SECRET,
    InstallDefaults,
)

DEFAULTS = InstallDefaults(
    image="registry.example/trainer:install",
    endpoint="http://minio.storage:9000",
    region="eu-west-1",
    secret_name="s3-credentials",
)


def _run(storage: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubealign.io/v1alpha1",
        "kind": "AlignmentRun",
        "metadata": {"name": "r", "namespace": "team"},
        "spec": {
            "image": "trainer:1",
            "storage": storage,
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "inputs": {"model": {"uri": "s3://b00/m"}, "data": {"uri": "s3://b00/d"}},
                }
            ],
        },
        "status": {"phase": "Running"},
    }


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        (
            {"uri": "s3://bucket/runs"},
            {
                "uri": "s3://bucket/runs",
                "endpoint": "http://minio.storage:9000",
                "region": "eu-west-1",
                "secretRef": {"name": "s3-credentials"},
            },
        ),
        # What the run sets wins, field by field.
        (
            {"uri": "s3://bucket/runs", "endpoint": "http://other:9000", "secretRef": {"name": "mine"}},
            {
                "uri": "s3://bucket/runs",
                "endpoint": "http://other:9000",
                "region": "eu-west-1",
                "secretRef": {"name": "mine"},
            },
        ),
        # A local store needs neither endpoint nor credentials.
        ({"uri": "file:///data/runs"}, {"uri": "file:///data/runs"}),
    ],
)
def test_defaults_fill_only_missing_fields(storage: dict[str, Any], expected: dict[str, Any]) -> None:
    manifest = _run(storage)
    applied = DEFAULTS.apply(manifest)
    assert applied["spec"]["storage"] == expected
    assert manifest["spec"]["storage"] == storage, "the input manifest must not be modified"
    assert applied["status"] == manifest["status"]
    if expected.get("secretRef"):
        parsed = api.AlignmentRun.from_manifest(applied).spec.storage
        assert (parsed.endpoint, parsed.secret_name) == (expected["endpoint"], expected["secretRef"]["name"])


def test_no_defaults_change_nothing() -> None:
    manifest = _run({"uri": "s3://bucket/runs"})
    assert InstallDefaults().apply(manifest) == manifest


def test_malformed_specs_are_left_for_validation() -> None:
    for manifest in ({"spec": None}, {"spec": ["x"]}, {}):
        assert DEFAULTS.apply(manifest) == manifest
    # The image is filled all the same; the malformed storage is left for validation to name.
    applied = DEFAULTS.apply({"spec": {"storage": "s3://x00"}})
    assert applied == {"spec": {"storage": "s3://x00", "image": "registry.example/trainer:install"}}


def test_from_env_reads_the_charts_variables() -> None:
    env = {
        ENV_IMAGE: "trainer:2",
        ENV_ENDPOINT: "http://s3.local",
        ENV_REGION: "",
        ENV_SECRET: "creds",
        ENV_QUEUE_NAME: "gpus",
    }
    assert InstallDefaults.from_env(env) == InstallDefaults(
        image="trainer:2", endpoint="http://s3.local", secret_name="creds", queue_name="gpus"
    )
    assert InstallDefaults.from_env({}) == InstallDefaults()


def _without_image(**stage_fields: Any) -> dict[str, Any]:
    manifest = _run({"uri": "file:///data/runs"})
    del manifest["spec"]["image"]
    manifest["spec"]["stages"][0].update(stage_fields)
    return manifest


def test_the_install_image_fills_a_run_without_one() -> None:
    manifest = _without_image()
    assert api.validate(manifest, require_image=True)[0].path == "spec.image"
    applied = DEFAULTS.apply(manifest)
    assert applied["spec"]["image"] == "registry.example/trainer:install"
    assert "image" not in manifest["spec"], "the input manifest must not be modified"
    assert api.validate(applied, require_image=True) == []
    assert api.AlignmentRun.from_manifest(applied).spec.image == "registry.example/trainer:install"


@pytest.mark.parametrize(
    ("spec_image", "stage_image", "expected"),
    [
        # The run's own image wins; a stage's image still wins over both when the pod is rendered.
        ("trainer:run", None, "trainer:run"),
        ("trainer:run", "trainer:stage", "trainer:run"),
        (None, "trainer:stage", "registry.example/trainer:install"),
        # An empty image is invalid, not absent: validation names it instead of the default hiding it.
        ("", None, ""),
    ],
)
def test_what_the_run_sets_wins_over_the_install_image(
    spec_image: str | None, stage_image: str | None, expected: str
) -> None:
    manifest = _without_image(**({"image": stage_image} if stage_image else {}))
    if spec_image is not None:
        manifest["spec"]["image"] = spec_image
    assert DEFAULTS.apply(manifest)["spec"]["image"] == expected


def test_without_an_install_image_a_run_without_one_stays_invalid() -> None:
    applied = InstallDefaults(endpoint="http://s3.local").apply(_without_image())
    assert "image" not in applied["spec"]
    (error,) = api.validate(applied, require_image=True)
    assert error.path == "spec.image" and ENV_IMAGE in error.message


@pytest.mark.parametrize(
    ("environ", "tracking", "expected"),
    [
        ({}, None, None),
        ({ENV_MLFLOW_URI: "http://mlflow:5000"}, None, {"mlflow": {"uri": "http://mlflow:5000"}}),
        (
            {ENV_MLFLOW_URI: "http://mlflow:5000", ENV_MLFLOW_EXPERIMENT: "team", ENV_MLFLOW_SECRET: "ml"},
            None,
            {"mlflow": {"uri": "http://mlflow:5000", "experiment": "team", "secretRef": {"name": "ml"}}},
        ),
        # What the run says wins, and an empty tracking opts the run out of the default.
        (
            {ENV_MLFLOW_URI: "http://mlflow:5000"},
            {"mlflow": {"uri": "http://own"}},
            {"mlflow": {"uri": "http://own"}},
        ),
        ({ENV_MLFLOW_URI: "http://mlflow:5000"}, {}, {}),
    ],
)
def test_the_install_tracker_fills_runs_without_tracking(
    environ: dict[str, str], tracking: dict[str, Any] | None, expected: dict[str, Any] | None
) -> None:
    manifest = _run({"uri": "file:///data/runs"})
    if tracking is not None:
        manifest["spec"]["tracking"] = tracking
    applied = InstallDefaults.from_env(environ).apply(manifest)
    assert applied["spec"].get("tracking") == expected
    assert api.validate(applied) == []
