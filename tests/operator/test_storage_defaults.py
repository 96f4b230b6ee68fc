"""Install-wide storage defaults fill only what a run's spec.storage leaves out."""

from __future__ import annotations

from typing import Any

import pytest

from kubealign import api
from kubealign.defaults import ENV_ENDPOINT, ENV_REGION, ENV_SECRET, StorageDefaults

DEFAULTS = StorageDefaults(
    endpoint="http://minio.storage:9000", region="eu-west-1", secret_name="s3-credentials"
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
                    "inputs": {"model": {"uri": "s3://b/m"}, "data": {"uri": "s3://b/d"}},
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
    assert StorageDefaults().apply(manifest) == manifest


def test_malformed_specs_are_left_for_validation() -> None:
    for manifest in ({"spec": {"storage": "s3://x"}}, {"spec": None}, {}):
        assert DEFAULTS.apply(manifest) == manifest


def test_from_env_reads_the_charts_variables() -> None:
    env = {ENV_ENDPOINT: "http://s3.local", ENV_REGION: "", ENV_SECRET: "creds"}
    assert StorageDefaults.from_env(env) == StorageDefaults(endpoint="http://s3.local", secret_name="creds")
