"""Checkpoints: atomic publish, newest good one wins, partial/corrupt/unloadable ones are skipped, pruning."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kubealign_jobs import checkpoint, storage
from kubealign_jobs import model as models
from tests.jobs.trainer_toys import save_tiny_lm


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(params=["s3", "file"])
def checkpoints_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/run/sft/checkpoints"
    return str(tmp_path / "out" / "checkpoints")


def _save(uri: str, step: int, model_dir: Path, scratch: Path, keep_last: int = 5) -> str:
    lm = models.load_causal_lm(model_dir)
    tokenizer = models.load_tokenizer(model_dir)
    return checkpoint.save_checkpoint(
        checkpoints_uri=uri,
        step=step,
        write_model=lambda dest: models.save_pretrained(lm, tokenizer, dest),
        state={"data_position": {"epoch": 0, "index": step * 4}, "rng": [checkpoint.capture_rng_state()]},
        scratch=scratch,
        keep_last=keep_last,
    )


@pytest.mark.s3
def test_latest_complete_checkpoint_is_loaded(
    checkpoints_uri: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    _save(checkpoints_uri, 10, tiny_lm_dir, tmp_path / "s")
    uri = _save(checkpoints_uri, 20, tiny_lm_dir, tmp_path / "s")
    assert uri.endswith("/step-00000020")
    found = checkpoint.latest_checkpoint(checkpoints_uri, tmp_path / "scratch")
    assert found is not None and found.step == 20
    assert found.state["data_position"] == {"epoch": 0, "index": 80}
    reloaded = models.load_causal_lm(found.model_dir)  # a checkpoint's model is a save_pretrained folder
    assert models.count_parameters(reloaded) == models.count_parameters(models.load_causal_lm(tiny_lm_dir))


@pytest.mark.s3
@pytest.mark.parametrize("damage", ["no-manifest", "checksum", "truncated", "unloadable", "garbage-weights"])
def test_damaged_newest_checkpoint_falls_back_to_previous_and_is_superseded(
    checkpoints_uri: str, tiny_lm_dir: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _save(checkpoints_uri, 10, tiny_lm_dir, tmp_path / "s")
    newest = _save(checkpoints_uri, 20, tiny_lm_dir, tmp_path / "s")
    state_uri = storage.join(newest, checkpoint.STATE_FILE)
    if damage == "no-manifest":  # a preemption between the uploads and the manifest
        storage.delete_prefix(newest)
        storage.write_bytes(state_uri, b"half")
    elif damage == "checksum":
        original = storage.read_bytes(state_uri)
        storage.write_bytes(state_uri, bytes(b ^ 0xFF for b in original[:16]) + original[16:])
    elif damage == "truncated":
        storage.write_bytes(state_uri, storage.read_bytes(state_uri)[:100])
    elif damage == "garbage-weights":  # weights that were garbage when published: the manifest agrees
        copy = checkpoint.load_checkpoint(newest, tmp_path / "copy")
        source = copy.model_dir.parent
        weights = source / checkpoint.MODEL_DIR / "model.safetensors"
        weights.write_bytes(random.Random(0).randbytes(weights.stat().st_size))
        storage.publish_dir(source, newest, overwrite=True)
    else:  # a valid manifest over a file that is not a checkpoint at all
        bogus = tmp_path / "bogus"
        (bogus / "model").mkdir(parents=True)
        (bogus / "model" / "config.json").write_text("{}")
        (bogus / checkpoint.STATE_FILE).write_bytes(b"not a torch file")
        storage.publish_dir(bogus, newest, overwrite=True)
    with caplog.at_level(logging.WARNING):
        found = checkpoint.latest_checkpoint(checkpoints_uri, tmp_path / "scratch")
    assert found is not None and found.step == 10
    assert "ignoring checkpoint at step 20" in caplog.text
    if damage == "garbage-weights":
        assert "model/model.safetensors is not a readable safetensors file" in caplog.text
    # Training goes on from step 10 and reaches step 20 again: the damaged checkpoint is
    # superseded (never kept, which would send every later retry back to step 10).
    _save(checkpoints_uri, 20, tiny_lm_dir, tmp_path / "s")
    again = checkpoint.latest_checkpoint(checkpoints_uri, tmp_path / "scratch-2")
    assert again is not None and again.step == 20


@pytest.mark.s3
def test_no_good_checkpoint_means_none(checkpoints_uri: str, tmp_path: Path) -> None:
    assert checkpoint.latest_checkpoint(checkpoints_uri, tmp_path) is None
    storage.write_text(storage.join(checkpoints_uri, "step-00000005", "junk"), "x")
    assert checkpoint.latest_checkpoint(checkpoints_uri, tmp_path) is None


@pytest.mark.s3
def test_pruning_keeps_newest_good_ones(checkpoints_uri: str, tiny_lm_dir: Path, tmp_path: Path) -> None:
    for step in (5, 10, 15):
        _save(checkpoints_uri, step, tiny_lm_dir, tmp_path / "s", keep_last=2)
    steps = [step for step, _ in checkpoint.list_checkpoints(checkpoints_uri)]
    assert steps == [10, 15]
    # A newer partial folder (an attempt that died mid-upload) is not "good": step 15 must survive.
    storage.write_text(storage.join(checkpoint.step_uri(checkpoints_uri, 20), "model", "config.json"), "{}")
    deleted = checkpoint.prune_checkpoints(checkpoints_uri, keep_last=1)
    assert deleted == [checkpoint.step_uri(checkpoints_uri, 10)]
    assert [s for s, _ in checkpoint.list_checkpoints(checkpoints_uri)] == [15, 20]
    found = checkpoint.latest_checkpoint(checkpoints_uri, tmp_path / "scratch")
    assert found is not None and found.step == 15


def test_rng_state_roundtrip() -> None:
    state = checkpoint.capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
