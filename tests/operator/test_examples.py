"""Every AlignmentRun manifest under examples/ passes the checks of `kubealign validate` (same loader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubealign import api

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"


def alignment_run_manifests() -> list[Path]:
    """The YAML files under examples/ that hold at least one AlignmentRun document."""
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        documents = api.load_manifests(path.read_text(encoding="utf-8"))
        if any(isinstance(doc.body, dict) and doc.body.get("kind") == api.KIND for doc in documents):
            found.append(path)
    return found


MANIFESTS = alignment_run_manifests()


def test_the_known_examples_are_found() -> None:
    # Guards the parametrisation below: a glob that finds nothing would make it pass vacuously.
    relative = {path.relative_to(REPO_ROOT).as_posix() for path in MANIFESTS}
    assert {"examples/alignmentrun-cluster.yaml", "examples/sentiment/alignmentrun.yaml"} <= relative


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_example_manifest_is_valid(path: Path) -> None:
    documents = api.load_manifests(path.read_text(encoding="utf-8"))
    errors = [
        f"{path.relative_to(REPO_ROOT)}:{document.line_of(error.path)}: {error}"
        for document in documents
        for error in api.validate(document.body)
    ]
    assert errors == []
