"""Resumable checkpoints, published atomically under ``<output>/checkpoints/step-%08d/``.

A checkpoint folder holds:

    model/               save_pretrained weights + tokenizer (loadable by plain transformers)
    trainer_state.pt     step, optimizer, scheduler, data position, RNG states of every rank,
                         the stage config and any stage-specific extras
    _MANIFEST.json       written last by `storage.publish_dir`; no manifest, no checkpoint

A sharded (FSDP) or LoRA stage writes a distributed checkpoint instead: ``model/`` holds only
the config and tokenizer, ``dcp/`` the model and optimizer state as
`torch.distributed.checkpoint` shards (each rank wrote its own file; ``.metadata`` maps them),
and ``trainer_state.pt`` the rest. Every rank uploads its shard and rank 0 writes the manifest
last (``storage.begin_parts`` / ``upload_part`` / ``commit_parts``): the same commit point.

`latest_checkpoint` walks the checkpoints newest first and returns the first one that is
complete, matches its checksums and loads; anything else (a preemption mid-upload, a
truncated or corrupted file) is skipped with a warning, so the run falls back to the previous
good checkpoint instead of crashing or resuming from garbage. Pruning keeps the newest K
complete checkpoints and never deletes the newest good one.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kubealign_jobs import storage

log = logging.getLogger(__name__)

STEP_PREFIX = "step-"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"
DCP_DIR = "dcp"
_STEP_RE = re.compile(r"step-(\d{8,})$")


def step_uri(checkpoints_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri, f"{STEP_PREFIX}{step:08d}")


class CheckpointError(RuntimeError):
    """A checkpoint is present but unusable."""


@dataclass(frozen=True)
class Checkpoint:
    """A fetched, verified checkpoint: its step, local model folder and trainer state."""

    uri: str
    step: int
    model_dir: Path
    state: dict[str, Any]
    dcp_dir: Path | None = None  # a distributed checkpoint's shards; then model_dir has no weights

    @property
    def distributed(self) -> bool:
        return self.dcp_dir is not None


# ---------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    python_state = random.getstate()
    numpy_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": {
            "key": torch.from_numpy(np.asarray(numpy_state[1]).astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save / load


def save_checkpoint(
    *,
    checkpoints_uri: str,
    step: int,
    write_model: Any,
    state: dict[str, Any],
    scratch: Path,
    keep_last: int,
) -> str:
    """Write and publish checkpoint ``step``; prune old ones; return its URI. Rank 0 only.

    ``write_model(dest)`` saves the model and tokenizer into ``dest`` (save_pretrained);
    ``state`` is everything else (optimizer, scheduler, data position, RNG, config, extras).
    """
    uri = step_uri(checkpoints_uri, step)
    local = scratch / f"{STEP_PREFIX}{step:08d}"
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    try:
        write_model(local / MODEL_DIR)
        torch.save({**state, "step": step}, local / STATE_FILE)
        # A checkpoint already at this step was left by an earlier attempt that this one resumed
        # before: resume takes the newest usable checkpoint, so it was unusable (truncated,
        # corrupt) and is superseded. Keeping it would leave the stage resuming before it forever.
        if storage.is_complete(uri):
            log.warning("checkpoint %s: replacing the one an earlier attempt left (resume skipped it)", uri)
        storage.publish_dir(local, uri, metadata={"step": step}, overwrite=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    prune_checkpoints(checkpoints_uri, keep_last=keep_last)
    return uri


def list_checkpoints(checkpoints_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every step folder, complete or not, oldest first."""
    found = []
    for uri in storage.list_prefixes(checkpoints_uri):
        match = _STEP_RE.search(uri)
        if match:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def load_checkpoint(uri: str, scratch: Path) -> Checkpoint:
    """Fetch and verify one checkpoint; `storage.StorageError` or `CheckpointError` when it is bad."""
    storage.fetch_dir(uri, local_dir(uri, scratch), require_manifest=True)
    return open_checkpoint(uri, scratch)


def local_dir(uri: str, scratch: Path) -> Path:
    """Where a checkpoint is read from: its own directory when local, else its copy under ``scratch``."""
    location = storage.parse_uri(uri)
    if location.scheme == "file" and location.path is not None:
        return location.path
    return scratch / uri.rstrip("/").rsplit("/", 1)[-1]


def open_checkpoint(uri: str, scratch: Path) -> Checkpoint:
    """A checkpoint already fetched and verified into ``scratch`` (by this or another local process)."""
    local = local_dir(uri, scratch)
    try:
        state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(f"{uri}: {STATE_FILE} does not load: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{uri}: {STATE_FILE} holds no step")
    if not (local / MODEL_DIR / "config.json").is_file():
        raise CheckpointError(f"{uri}: no {MODEL_DIR}/config.json")
    _check_weights(uri, local)
    dcp_dir = None
    if state.get("format") == DCP_DIR:
        dcp_dir = local / DCP_DIR
        if not (dcp_dir / ".metadata").is_file():
            raise CheckpointError(f"{uri}: a distributed checkpoint without {DCP_DIR}/.metadata")
    return Checkpoint(
        uri=uri, step=int(state["step"]), model_dir=local / MODEL_DIR, state=state, dcp_dir=dcp_dir
    )


def _check_weights(uri: str, local: Path) -> None:
    """Every weights file must parse as safetensors (header, tensor table, offsets within the file).

    The manifest's checksums catch damage after publishing; this catches files that were wrong
    when they were published (or a manifest rewritten over garbage), which would otherwise fail
    later in ``from_pretrained`` with an error naming no checkpoint.
    """
    for path in sorted(local.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    weights.get_slice(name).get_shape()
        except Exception as exc:  # safetensors raises its own error types for every malformed file
            where = path.relative_to(local)
            raise CheckpointError(f"{uri}: {where} is not a readable safetensors file: {exc}") from exc


def latest_checkpoint(checkpoints_uri: str, scratch: Path) -> Checkpoint | None:
    """The newest checkpoint that is complete, verified and loadable; None if there is none."""
    for step, uri in reversed(list_checkpoints(checkpoints_uri)):
        try:
            checkpoint = load_checkpoint(uri, scratch)
        except (storage.StorageError, CheckpointError) as exc:
            log.warning("ignoring checkpoint at step %d: %s", step, exc)
            continue
        log.info("resuming from %s", uri)
        return checkpoint
    return None


def prune_checkpoints(checkpoints_uri: str, *, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return what was deleted.

    Incomplete folders older than the newest complete checkpoint are garbage from interrupted
    attempts and go too; newer incomplete ones are left for the attempt that may own them.
    """
    keep_last = max(keep_last, 1)
    entries = list_checkpoints(checkpoints_uri)
    complete = [(step, uri) for step, uri in entries if storage.is_complete(uri)]
    if not complete:
        return []
    keep = {uri for _, uri in complete[-keep_last:]}
    newest_good = complete[-1][0]
    deleted = []
    for step, uri in entries:
        if uri in keep or step > newest_good:
            continue
        storage.delete_prefix(uri)
        deleted.append(uri)
    return deleted
