"""The AlignmentRun API on the real API server: the CRD installs, explains itself, and rejects bad runs
naming the field at fault (the same cases api.validate rejects in tests/operator/test_api.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from kubealign import api
from tests.cluster.operator_harness import submit
from tests.operator.generated_manifests import generated
from tests.operator.run_builders import invalid_cases, manifest

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster

CASES = invalid_cases()


def test_crd_is_served_with_short_names_and_columns(cluster: Cluster, crd: None, namespace: str) -> None:
    resources = cluster.kubectl("api-resources", "--api-group=kubealign.io", "-o", "wide").stdout
    assert "alignmentruns" in resources and "alr,arun" in resources and "AlignmentRun" in resources
    submit(cluster, namespace, manifest(name="columns"))
    table = cluster.kubectl("get", "arun", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "AGE"]
    assert table[1].split()[0] == "columns"


@pytest.mark.parametrize(
    ("field", "teaches"),
    [
        ("alignmentrun.spec.stages", "listed in dependency order"),
        ("alignmentrun.spec.stages.inputs.rewardModel", "a ground-truth scorer by name"),
        ("alignmentrun.spec.stages.resources.nodes", "Indexed Job"),
        ("alignmentrun.spec.storage.secretRef", "AWS_ACCESS_KEY_ID"),
        ("alignmentrun.spec.suspend", "resumes from the latest checkpoint"),
        ("alignmentrun.status.stages.metrics", "termination message"),
        ("alignmentrun.status.conditions", "InvalidSpec"),
    ],
)
def test_kubectl_explain_teaches_the_api(cluster: Cluster, crd: None, field: str, teaches: str) -> None:
    text = " ".join(cluster.kubectl("explain", field).stdout.split())
    assert teaches in text


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_api_server_rejects_invalid_run_naming_the_field(
    cluster: Cluster, crd: None, namespace: str, case: dict[str, Any]
) -> None:
    result = cluster.kubectl(
        "create", "-n", namespace, "-f", "-", input=json.dumps(case["manifest"]), check=False
    )
    assert result.returncode != 0, f"{case['id']}: accepted by the API server"
    for expected in case["expect"]:
        assert expected in result.stderr, f"{case['id']}: {expected!r} not in: {result.stderr}"
    # api.validate, the local runner's check, rejects it too.
    assert api.validate(case["manifest"])


def test_api_server_accepts_a_run_without_any_image(cluster: Cluster, crd: None, namespace: str) -> None:
    """The image may come from the operator's install-wide default, which only the operator knows."""
    body = manifest(name="imageless")
    del body["spec"]["image"]
    submit(cluster, namespace, body)
    stored = json.loads(cluster.kubectl("get", "alr", "imageless", "-n", namespace, "-o", "json").stdout)
    assert "image" not in stored["spec"]
    assert api.validate(stored) == []
    assert [e.path for e in api.validate(stored, require_image=True)] == ["spec.image"]


def test_api_server_accepts_the_full_pipeline_and_applies_defaults(
    cluster: Cluster, crd: None, namespace: str
) -> None:
    submit(cluster, namespace, manifest(name="full"))
    stored = json.loads(cluster.kubectl("get", "alr", "full", "-n", namespace, "-o", "json").stdout)
    first = stored["spec"]["stages"][0]
    assert (first["maxRetries"], stored["spec"]["suspend"]) == (2, False)
    assert api.validate(stored) == []


def test_validate_and_the_api_server_agree_on_every_generated_manifest(
    kube_api: Any, crd: None, namespace: str
) -> None:
    """`kubealign validate` claims to check exactly as the server does: over manifests generated
    from the CRD's schema (tests/operator/generated_manifests.py), both accept or both refuse."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom: Any = client.CustomObjectsApi(kube_api)
    disagreements = []
    cases = generated()
    for case_id, body in cases:
        try:
            custom.create_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, body, dry_run="All"
            )
            server = ""
        except ApiException as exc:
            if exc.status not in (400, 422):
                raise
            server = json.loads(exc.body or "{}").get("message", str(exc))
        local = "; ".join(str(error) for error in api.validate(body))
        if bool(server) != bool(local):
            disagreements.append(f"{case_id}: server {'refused: ' + server if server else 'accepted'}; "
                                 f"validate {'refused: ' + local if local else 'accepted'}")  # fmt: skip
    print(f"{len(cases)} generated manifests, {len(disagreements)} disagreements")
    assert not disagreements, "\n".join(disagreements)
