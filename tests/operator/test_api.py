"""kubealign.api: the CRD's Python twin. Table-driven: valid runs pass, each invalid one names its field."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from kubealign import api, crdgen
from tests.operator.catalogue_cases import every_type
from tests.operator.run_builders import invalid_cases, manifest, pipeline, src, stage, uri

CASES = invalid_cases()


def test_full_pipeline_is_valid() -> None:
    assert api.validate(manifest()) == []


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_invalid_manifest_names_the_field(case: dict[str, Any]) -> None:
    errors = api.validate(case["manifest"])
    assert errors, f"{case['id']}: accepted"
    text = "\n".join(map(str, errors))
    for expected in case["expect"]:
        assert expected in text, f"{case['id']}: {expected!r} not in:\n{text}"


def test_at_least_ten_distinct_invalid_cases() -> None:
    assert len({c["id"] for c in CASES}) >= 10


def test_every_cel_rule_of_the_crd_has_a_python_twin() -> None:
    """The messages api.py emits for CEL rules are exactly the CRD's, so the two cannot drift apart."""
    crd_messages = {rule["message"] for _, rule in api.cel_rules()}
    twins = {
        api.MSG_RUN_NAME,
        api.MSG_SELF_INPUT,
        api.MSG_EXACTLY_ONE,
        api.MSG_POLICY_NAME,
        api.MSG_HUB_DATASET,
        api.MSG_NON_NEGATIVE,
        *(message for _, message in api.QUANTITY_BOUNDS.values()),
        *crdgen.crd_messages(),
        *(api.msg_from_earlier(role) for role, _ in api.SINGLE_ROLES),
        api.msg_from_earlier("policies"),
    }
    assert crd_messages == twins


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", "4"), ("500m", "0.5"), ("+1.5", "1.5"), (".5", "0.5"), ("16Gi", str(16 * 2**30)),
        ("1k", "1000"), ("1e3", "1000"), ("1E-3", "0.001"), ("4096001m", "4096.001"),
        ("-4", None), ("1.5.2", None), ("4 Gi", None), ("1e1.5", None), ("Gi", None),
    ],
)  # fmt: skip
def test_quantities_are_parsed_as_kubernetes_parses_them(text: str, value: str | None) -> None:
    parsed = api.quantity_value(text)
    assert (None if parsed is None else parsed.normalize()) == (
        None if value is None else Decimal(value).normalize()
    )


def test_cel_rules_cover_every_input_role() -> None:
    fields = {rule.get("fieldPath") for _, rule in api.cel_rules()}
    for role, _ in api.SINGLE_ROLES:
        assert f".inputs.{role}.from" in fields


def _description_gaps(node: dict[str, Any], path: str) -> list[str]:
    gaps = [] if "description" in node or path in ("", "metadata") else [path]
    for name, child in node.get("properties", {}).items():
        gaps += _description_gaps(child, f"{path}.{name}".lstrip("."))
    if "items" in node:
        gaps += _description_gaps(node["items"], f"{path}[]")
    return gaps


def test_every_field_of_the_crd_is_described() -> None:
    assert _description_gaps(api.openapi_schema(), "") == []


def test_crd_defaults_match_the_dataclass_defaults() -> None:
    item = api.openapi_schema()["properties"]["spec"]["properties"]["stages"]["items"]
    resources = item["properties"]["resources"]["properties"]
    assert resources["nodes"]["default"] == api.Resources().nodes
    assert resources["gpusPerNode"]["default"] == api.Resources().gpus_per_node
    assert item["properties"]["maxRetries"]["default"] == api.Stage(name="x", type="sft").max_retries
    assert item["properties"]["type"]["enum"] == list(api.STAGE_TYPES)


def test_crd_shape() -> None:
    crd = api.load_crd()
    assert crd["metadata"]["name"] == api.CRD_NAME
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], set(names["shortNames"])) == (
        api.KIND,
        api.PLURAL,
        {"alr", "arun"},
    )
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Stage": ".status.runningStages",
        "Progress": ".status.progress",
        "Message": '.status.conditions[?(@.type=="Progressing")].message',
        "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize(
    ("role", "upstream_type", "needs"),
    [
        ("rewardModel", "sft", "a reward model (reward)"),
        ("model", "reward", "a model (pretrain, sft, dpo, kto, ppo, grpo)"),
        ("data", "sft", "a dataset (generate)"),
    ],
)
def test_inputs_must_come_from_a_stage_that_makes_that_kind_of_thing(
    role: str, upstream_type: str, needs: str
) -> None:
    """Beyond the schema: the operator reports these as Valid=False rather than crash-looping."""
    first = stage("up", upstream_type, inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/x")})
    inputs = {
        "model": uri("s3://m00/base"),
        "rewardModel": uri("s3://m00/rm"),
        "data": uri("s3://d00/p"),
        role: src("up"),
    }
    body = manifest([first, stage("ppo", "ppo", inputs=inputs)])
    errors = api.validate(body)
    assert [e.path for e in errors] == [f"spec.stages[1].inputs.{role}.from"]
    assert needs in errors[0].message


def test_duplicate_policy_names_are_rejected() -> None:
    body = manifest()
    body["spec"]["stages"][-1]["inputs"]["policies"].append({"uri": "s3://m00/other", "name": "dpo"})
    errors = api.validate(body)
    assert [e.path for e in errors] == ["spec.stages[6].inputs.policies[3]"]


def test_wrong_kind_and_api_version_are_named() -> None:
    body = manifest()
    body["kind"], body["apiVersion"] = "Run", "kubealign.io/v1"
    assert {e.path for e in api.validate(body)} == {"kind", "apiVersion"}


def test_parse_applies_crd_defaults_and_keeps_inputs() -> None:
    run = api.AlignmentRun.from_manifest(manifest())
    ppo = run.spec.stage("ppo")
    assert (ppo.resources.nodes, ppo.resources.gpus_per_node, ppo.max_retries) == (1, 0, 2)
    assert ppo.inputs.upstream() == ("sft", "reward")
    evaluate = run.spec.stage("evaluate")
    assert [p.policy_name for p in evaluate.inputs.policies] == ["dpo", "ppo", "base"]
    assert evaluate.inputs.upstream() == ("reward", "sft", "dpo", "ppo")


def test_status_round_trips_through_dicts() -> None:
    status = api.RunStatus(
        phase=api.RunPhase.RUNNING,
        observed_generation=3,
        conditions=(api.Condition("Valid", "True", "SpecValid", "", "2026-01-01T00:00:00Z", 3),),
        start_time="2026-01-01T00:00:00Z",
        progress="1/2",
        running_stages="dpo,ppo",
        stages=(
            api.StageStatus(
                "sft", "sft", api.StagePhase.SUCCEEDED, "r-sft-1", 1, "t0", "t1", "s3://o00", {"loss": 0.5}
            ),
            api.StageStatus(
                "dpo",
                "dpo",
                api.StagePhase.RUNNING,
                "r-dpo-2",
                2,
                "t1",
                None,
                "s3://o200",
                None,
                "attempt 1 failed",
            ),
        ),
    )
    assert api.RunStatus.from_dict(status.to_dict()) == status
    assert api.RunStatus.from_dict(None) == api.RunStatus()
    assert api.RunStatus.from_dict({"stages": ["garbage"], "conditions": [1]}) == api.RunStatus()


def test_manifest_lines_point_at_the_field() -> None:
    text = "\n".join(
        [
            "apiVersion: kubealign.io/v1alpha1",
            "kind: AlignmentRun",
            "metadata: {name: demo}",
            "spec:",
            "  image: trainer",
            "  storage: {uri: 's3://b00/p'}",
            "  stages:",
            "  - name: sft",
            "    type: sft",
            "    inputs:",
            "      data: {uri: 'http://nope'}",
            "---",
            "apiVersion: kubealign.io/v1alpha1",
        ]
    )
    first, second = api.load_manifests(text)
    (error,) = api.validate(first.body)
    assert error.path == "spec.stages[0].inputs.data.uri"
    assert first.line_of(error.path) == 11
    # A missing field points at its nearest parent that is in the file.
    assert first.line_of("spec.stages[0].resources.nodes") == 8
    assert second.start_line == 13


def test_a_run_without_any_image_is_valid_until_the_operator_needs_one() -> None:
    """The schema leaves the image to the install-wide default; the operator names what is missing."""
    body = manifest(pipeline()[:2])
    del body["spec"]["image"]
    body["spec"]["stages"][0]["image"] = "trainer:pretrain"
    assert api.validate(body) == []
    (error,) = api.validate(body, require_image=True)
    assert error.path == "spec.image"
    assert "stage(s) sft:" in error.message and "defaultTrainerImage" in error.message
    body["spec"]["stages"][1]["image"] = "trainer:sft"
    assert api.validate(body, require_image=True) == []
    assert api.validate(manifest(), require_image=True) == []


def test_the_image_check_waits_for_the_schema_to_pass() -> None:
    body = manifest([stage("sft", "sft", inputs={"data": uri("http://nope")})])
    del body["spec"]["image"]
    assert [e.path for e in api.validate(body, require_image=True)] == ["spec.stages[0].inputs.data.uri"]


def test_validate_never_raises_on_garbage() -> None:
    broken = manifest()
    broken["spec"]["stages"] = [1]
    garbage: list[Any] = [None, [], "x", {"spec": []}, {"spec": {"stages": "x"}}, broken]
    for body in garbage:
        assert api.validate(body)


def test_the_builders_cover_every_stage_type() -> None:
    """The catalogue cases run every type; the pipeline is the paper's DAG, without kto and grpo."""
    assert {s["type"] for s in every_type()} == set(api.STAGE_TYPES)
    assert {s["type"] for s in pipeline()} == set(api.STAGE_TYPES) - {"kto", "grpo"}


@pytest.mark.parametrize(
    "resources", [{"cpu": "4096", "memory": "64Ti"}, {"cpu": 4096, "memory": 70368744177664}, {"cpu": "500m"}]
)
def test_requests_at_the_bounds_are_valid(resources: dict[str, Any]) -> None:
    body = manifest(
        [
            stage(
                "sft",
                "sft",
                inputs={"model": uri("s3://m00/base"), "data": uri("s3://d00/sft")},
                resources=resources,
            )
        ]
    )
    assert api.validate(body) == []
