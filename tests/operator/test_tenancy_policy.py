"""kubealign.tenancy: the operator's half of the chart's tenancy policy (the admission half, and the
two agreeing, are in tests/cluster/test_tenancy.py)."""

from __future__ import annotations

import json

import pytest

from kubealign import api
from kubealign.k8s import Kube
from kubealign.reconcile import Reconciler
from kubealign.tenancy import ENV_POLICY, TenancyPolicy
from tests.operator.run_builders import manifest, stage, uri


def sft(**fields: object) -> dict[str, object]:
    return stage("sft", "sft", inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")}, **fields)


def test_no_policy_allows_everything() -> None:
    body = manifest([sft(tolerations=[{"operator": "Exists"}], podAnnotations={"anything/at-all": "x"})])
    assert TenancyPolicy.from_env({}).violations(body) == []


def test_the_charts_json_becomes_the_policy_and_names_each_field() -> None:
    values = {
        "allowedImagePrefixes": ["ghcr.io/team/"],
        "allowedServiceAccounts": ["trainer"],
        "allowedPriorityClasses": [],
        "allowedTolerationKeys": ["nvidia.com/gpu"],
        "allowBlanketTolerations": False,
        "allowedPodAnnotationPrefixes": ["kubealign.io/"],
    }
    policy = TenancyPolicy.from_env({ENV_POLICY: json.dumps(values)})
    body = manifest(
        [sft(image="evil/x", tolerations=[{"operator": "Exists"}, {"key": "other", "operator": "Exists"}])],
        image="ghcr.io/team/trainer:1",
        serviceAccountName="root",
        priorityClassName="anything",  # no list: any
        podAnnotations={
            "kubealign.io/kwok-run-seconds": "1",
            "seccomp.security.alpha.kubernetes.io/pod": "x",
        },
    )
    assert [v.path for v in policy.violations(body)] == [
        "spec.serviceAccountName",
        "spec.podAnnotations[seccomp.security.alpha.kubernetes.io/pod]",
        "spec.stages[0].image",
        "spec.stages[0].tolerations[0].key",
        "spec.stages[0].tolerations[1].key",
    ]


@pytest.mark.parametrize("bad", ['{"allowedImagePrefixes": "ghcr.io/"}', "[1]", "{not json"])
def test_a_malformed_policy_fails_naming_the_variable(bad: str) -> None:
    with pytest.raises(ValueError, match=ENV_POLICY):
        TenancyPolicy.from_env({ENV_POLICY: bad})


def test_the_operator_reports_a_refused_run_invalid_and_starts_nothing() -> None:
    class NoWrites(Kube):
        def __init__(self) -> None:
            super().__init__(None)
            self.statuses: list[dict[str, object]] = []

        def replace_run_status(self, namespace: str, name: str, status: object) -> dict[str, object]:
            assert isinstance(status, dict)
            self.statuses.append(status)
            return {
                "metadata": {"namespace": namespace, "name": name, "resourceVersion": "2"},
                "status": status,
            }

        def post_event(self, run: object, **_: object) -> None:
            return None

        def create(self, obj: object) -> dict[str, object]:
            raise AssertionError("a refused run must start nothing")

    kube = NoWrites()
    reconciler = Reconciler(kube, tenancy=TenancyPolicy(image_prefixes=("ghcr.io/team/",)))
    reconciler.cache.put_run(manifest([sft()], image="docker.io/evil/miner:1"))
    outcome = reconciler.reconcile("team-a", "demo")
    assert outcome is not None and outcome.actions == ()
    assert outcome.status.phase == api.RunPhase.FAILED
    valid = next(c for c in outcome.status.conditions if c.type == "Valid")
    assert (valid.status, valid.reason) == ("False", "InvalidSpec")
    assert valid.message.startswith(
        "spec.image: 'docker.io/evil/miner:1' does not start with an allowed prefix"
    )
