"""The stage catalogue at ``kubectl apply``: the real API server, with the generated CRD and admission
policy installed, refuses every manifest tests/operator/test_catalogue.py refuses, naming the field.

Server-side dry runs (the same admission chain as a create, nothing stored) keep ~450 cases to a
few seconds; one test also goes through ``kubectl apply`` as a user would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubealign import api
from kubealign_jobs.stages import CATALOGUE
from tests.cluster.operator_harness import install_crd
from tests.operator.catalogue_cases import cases, every_default_manifest
from tests.operator.run_builders import manifest, pipeline

if TYPE_CHECKING:
    from tests.conftest import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def custom(cluster: Cluster, kube_api: client.ApiClient) -> Iterator[client.CustomObjectsApi]:
    install_crd(cluster)
    yield client.CustomObjectsApi(kube_api)


def _dry_run(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> str:
    """The API server's refusal, or "" when it would create the run."""
    doc = json.loads(json.dumps(body))
    doc["metadata"] = {"name": doc["metadata"]["name"]}
    try:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, doc, dry_run="All", field_validation="Strict"
        )
    except ApiException as exc:
        return str(json.loads(exc.body or "{}").get("message", exc.body))
    return ""


def test_the_api_server_refuses_every_bad_hyperparameter_naming_it(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    missed = []
    for case in cases():
        refusal = _dry_run(custom, namespace, case.manifest())
        expected = [case.path]
        if case.id.endswith("-unknown-name"):
            expected.append(f"did you mean {case.name.removesuffix('x')}?")
        if not refusal or not all(text in refusal for text in expected):
            missed.append(f"{case.id}: {expected} not in {refusal!r}")
    assert not missed, "\n".join(missed[:20]) + f"\n({len(missed)} cases)"


def test_the_api_server_accepts_every_example_of_valid_hyperparameters(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    assert _dry_run(custom, namespace, every_default_manifest()) == ""
    assert _dry_run(custom, namespace, manifest()) == ""
    seeded = manifest()
    seeded["spec"]["seed"] = 3
    seeded["spec"]["stages"][4]["seed"] = 2**40
    assert _dry_run(custom, namespace, seeded) == ""
    seeded["spec"]["stages"][4]["seed"] = -1
    assert "spec.stages[4].seed" in _dry_run(custom, namespace, seeded)


def test_ppo_with_a_named_scorer_and_no_reward_model_is_accepted(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = manifest()
    ppo = body["spec"]["stages"][5]
    del ppo["inputs"]["rewardModel"]
    refusal = _dry_run(custom, namespace, body)
    assert "spec.stages[5].inputs.rewardModel: a ppo stage needs a reward" in refusal
    ppo["hyperparameters"] = {"scorer": "vader"}
    assert _dry_run(custom, namespace, body) == ""


def test_kubectl_apply_refuses_the_issue_example(
    cluster: Cluster, custom: client.CustomObjectsApi, namespace: str
) -> None:
    stages = pipeline()
    stages[5]["hyperparameters"] = {"ppo_epoch": 2}
    body = manifest(stages, name="typo")
    body["metadata"] = {"name": "typo"}
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert "spec.stages[5].hyperparameters.ppo_epoch" in result.stderr
    assert "did you mean ppo_epochs?" in result.stderr
    # Nothing was stored.
    assert cluster.kubectl("get", "alr", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_every_stage_type_is_exercised() -> None:
    assert {c.stage_type for c in cases()} == set(CATALOGUE)
