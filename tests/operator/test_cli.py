"""The kubealign command line: argument checking, `crd` and `validate` (file:line: field: message)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubealign import api
from kubealign.cli import main
from tests.operator.run_builders import manifest


def test_crd_prints_the_custom_resource_definition_and_its_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    crd, policy, binding = yaml.safe_load_all(capsys.readouterr().out)
    assert crd == api.load_crd()
    assert [policy["kind"], binding["kind"]] == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]


def test_validate_accepts_a_valid_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(manifest()))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().err == ""


def test_validate_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "runs.yaml"
    path.write_text(
        "\n".join(
            [
                "apiVersion: kubealign.io/v1alpha1",
                "kind: AlignmentRun",
                "metadata: {name: good}",
                "spec: {image: t, storage: {uri: 's3://b00'},",
                "       stages: [{name: a, type: sft, inputs: {model: {uri: 's3://m00'}, data: {uri: 's3://d00'}}}]}",
                "---",
                "apiVersion: kubealign.io/v1alpha1",
                "kind: AlignmentRun",
                "metadata: {name: bad}",
                "spec:",
                "  image: t",
                "  storage: {uri: 's3://b00'}",
                "  stages:",
                "  - name: dpo",
                "    type: dpo",
                "    inputs: {model: {uri: 's3://m00'}}",
            ]
        )
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"{path}:16: spec.stages[0].inputs.data: a dpo stage needs inputs.data (preference pairs)\n"


def test_validate_reports_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert main(["validate", str(broken), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"{broken}:" in err and "line 2" in err
    assert "missing.yaml" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["operator"],  # a scope is required
        ["operator", "--namespace", "a", "--all-namespaces"],
        ["operator", "-n", "a", "--resync-seconds", "soon"],
        [],
    ],
)
def test_operator_arguments_are_checked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: kubealign" in capsys.readouterr().err
