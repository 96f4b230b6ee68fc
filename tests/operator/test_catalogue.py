"""The stage catalogue at the first door: every bad hyperparameter is refused by ``kubealign validate``.

Table-driven from the catalogue (tests/operator/catalogue_cases.py): a wrong type, a value past
each bound, a near-miss choice and a misspelt name for every hyperparameter of every stage type.
tests/cluster/test_catalogue_api.py sends the same manifests to the real API server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubealign import api, crdgen
from kubealign.cli import main
from kubealign_jobs import stages
from kubealign_jobs.stages import CATALOGUE
from tests.operator.catalogue_cases import Case, cases, every_default_manifest
from tests.operator.run_builders import manifest, pipeline

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validate_refuses_a_bad_hyperparameter_naming_it(case: Case) -> None:
    errors = api.validate(case.manifest())
    # A list's bad item is named by its index: ...temperatures[0].
    assert [e.path.split("[")[0:2] for e in errors] == [case.path.split("[")[0:2]], errors
    assert errors[0].path.removeprefix(case.path) in ("", "[0]"), errors
    if case.id.endswith("-unknown-name"):
        known = case.name.removesuffix("x")
        assert f"unknown hyperparameter of {CATALOGUE[case.stage_type].article} {case.stage_type} stage" in (
            errors[0].message
        )
        assert f"did you mean {known}?" in errors[0].message


def test_every_stage_type_and_hyperparameter_has_cases() -> None:
    covered = {(c.stage_type, c.name) for c in CASES}
    for name, entry in CATALOGUE.items():
        for p in entry.params:
            assert (name, p.name) in covered
            bounded = any(b is not None for b in (p.ge, p.gt, p.le, p.lt))
            if bounded:
                assert any(
                    c.stage_type == name and c.name == p.name and c.id.endswith(("-ge", "-gt", "-le", "-lt"))
                    for c in CASES
                ), p.name


def test_a_manifest_spelling_out_every_default_is_valid() -> None:
    assert api.validate(every_default_manifest()) == []


def test_the_issue_example_names_the_field_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sixth stage that says ppo_epoch: 2 is refused before anything runs."""
    stages_ = pipeline()
    assert stages_[5]["type"] == "ppo"
    stages_[5]["hyperparameters"] = {"ppo_epoch": 2}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(manifest(stages_)))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.stages[5].hyperparameters.ppo_epoch" in err and "did you mean ppo_epochs?" in err
    assert err.count("\n") == 1


def test_cross_field_rules_are_checked_too() -> None:
    body = manifest()
    body["spec"]["stages"][5]["hyperparameters"] = {"rollout_batch_size": 6, "mini_batch_size": 4}
    errors = api.validate(body)
    assert [e.path for e in errors] == ["spec.stages[5].hyperparameters.mini_batch_size"]
    assert "does not divide" in errors[0].message


def test_ppo_may_take_a_named_scorer_instead_of_a_reward_model() -> None:
    body = manifest()
    ppo = body["spec"]["stages"][5]
    del ppo["inputs"]["rewardModel"]
    assert [e.path for e in api.validate(body)] == ["spec.stages[5].inputs.rewardModel"]
    ppo["hyperparameters"] = {"scorer": "vader"}
    assert api.validate(body) == []


@pytest.mark.parametrize("stage_type", stages.STAGE_TYPES)
def test_kubealign_stages_lists_every_hyperparameter(
    stage_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stages", stage_type]) == 0
    out = capsys.readouterr().out
    for p in CATALOGUE[stage_type].params:
        hyperparameters = out.split("hyperparameters (", 1)[1]
        line = next(line for line in hyperparameters.splitlines() if line.split()[:1] == [p.name])
        assert p.doc in line and p.describe_type().split()[0] in line


def test_kubealign_stages_ppo_shows_ppo_epochs_with_default_and_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["stages", "ppo"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["ppo_epochs"])
    assert line.split()[1:3] == ["integer", "4"] and "passes over each rollout batch" in line


def test_kubealign_stages_without_a_type_lists_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in stages.STAGE_TYPES)
    assert main(["stages", "ppx"]) == 2
    assert "did you mean ppo?" in capsys.readouterr().err


def test_the_crd_matches_the_catalogue() -> None:
    """The stage-type enum and the input rules are generated; editing either by hand fails here."""
    text = (Path(__file__).resolve().parents[2] / "crds" / api.CRD_FILE).read_text()
    assert crdgen.render_crd(text) == text
    item = api.openapi_schema()["properties"]["spec"]["properties"]["stages"]["items"]
    assert item["properties"]["type"]["enum"] == list(stages.STAGE_TYPES)
    assert api.policy_text() == crdgen.policy_text()


def test_a_drifted_crd_rule_is_detected() -> None:
    text = api.crd_text().replace("a dpo stage needs inputs.data", "a dpo stage wants inputs.data")
    assert crdgen.render_crd(text) != text
