"""hf://org/name[@revision] model inputs, offline: resolved from a hub cache the test builds.

The cache has the layout huggingface_hub writes (models--org--name/refs/<branch> holding a
commit, snapshots/<commit>/<files>); HF_HUB_OFFLINE=1 (tests/conftest.py) keeps every lookup
local, so a missing repository fails with an error that says so, never with a download.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubealign_jobs import hub
from kubealign_jobs import model as models
from tests.jobs.trainer_toys import run_stage, save_tiny_lm, sft_rows, stage_config, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(root: Path, repo: str, model: Path, *, refs: tuple[str, ...] = ("main",)) -> Path:
    """``root`` laid out as a hub cache holding ``model``'s files as ``repo`` at `COMMIT`."""
    folder = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model, folder / "snapshots" / COMMIT)
    (folder / "refs").mkdir(parents=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(COMMIT)
    return root


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = build_hub_cache(
        tmp_path / "hub", "kubealign-test/tiny", save_tiny_lm(tmp_path / "tiny"), refs=("main", "v1")
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize(
    "uri", ["hf://kubealign-test/tiny", f"hf://kubealign-test/tiny@{COMMIT}", "hf://kubealign-test/tiny@v1"]
)
def test_a_cached_hub_model_resolves_to_its_snapshot(hub_cache: Path, uri: str) -> None:
    folder = hub.fetch(uri)
    assert folder == hub_cache / "models--kubealign-test--tiny" / "snapshots" / COMMIT
    assert models.count_parameters(models.load_causal_lm(folder)) > 0


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://tiny", r"hf://tiny: not a hub model; expected hf://org/name"),
        ("hf://org/name@", r"hf://org/name@: empty revision"),
        ("hf://org/na me", r"not a hub model"),
        (
            "hf://kubealign-test/absent",
            r"hf://kubealign-test/absent: cannot fetch from the hub \(HF_HUB_OFFLINE",
        ),
        ("hf://kubealign-test/tiny@v2", r"hf://kubealign-test/tiny@v2: cannot fetch from the hub"),
    ],
)
def test_bad_or_missing_hub_models_are_refused_naming_the_uri(
    hub_cache: Path, uri: str, message: str
) -> None:
    with pytest.raises(hub.HubError, match=message):
        hub.fetch(uri)


@pytest.mark.slow
def test_sft_trains_from_an_hf_uri(tmp_path: Path) -> None:
    cache = build_hub_cache(tmp_path / "hub", "kubealign-test/tiny", save_tiny_lm(tmp_path / "tiny"))
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    output = tmp_path / "out"
    config = stage_config(
        tmp_path,
        stage_type="sft",
        output=output.as_uri(),
        inputs={"model": "hf://kubealign-test/tiny", "data": data.as_uri()},
        hyperparameters={"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "max_length": 48},
    )
    run = run_stage("sft", config, tmp_path, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (output / "artifact" / "config.json").is_file()
