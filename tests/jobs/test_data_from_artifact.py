"""A stage reading another stage's artifact as its dataset (inputs.data: {from: generate})."""

from __future__ import annotations

import json
from pathlib import Path

from kubealign_jobs import data, storage


def test_an_artifact_prefix_reads_as_data_without_its_manifest(tmp_path: Path) -> None:
    built = tmp_path / "built"
    built.mkdir()
    rows = [{"prompt": "The film", "chosen": " was fun.", "rejected": " was dull."}]
    (built / "preferences.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    artifact = (tmp_path / "store" / "generate" / "artifact").as_uri()
    storage.publish_dir(built, artifact)
    assert (tmp_path / "store" / "generate" / "artifact" / "_MANIFEST.json").is_file()

    found = data.data_files(artifact, tmp_path / "scratch")
    assert [Path(local).name for _, local in found] == ["preferences.jsonl"]
    pairs = data.load(artifact, tmp_path / "scratch2", data.preference_example)
    assert [(pair.prompt, pair.chosen, pair.rejected) for pair in pairs] == [
        ("The film", " was fun.", " was dull.")
    ]
