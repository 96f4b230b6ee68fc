"""Models on the Hugging Face Hub: ``hf://org/name[@revision]`` inputs.

This is the only way a trainer reaches a hub: every other model is a local folder loaded with
``local_files_only``. The snapshot goes to the hub cache (``HF_HOME``, on the pod's scratch
volume), once per node. The token comes from ``HF_TOKEN``, which the operator fills from the
Secret named in ``spec.huggingface.tokenSecretRef``; with ``HF_HUB_OFFLINE=1`` (the local
runner's and the tests' default) only what the cache already holds is found.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SCHEME = "hf://"
# org/name as the hub spells repository ids; the CRD's uri pattern says the same.
_REPO_ID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+")
# What a save_pretrained model needs: configs, safetensors weights, tokenizer files and templates;
# not the .bin, ONNX, GGUF or other copies a repository may also carry.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")


class HubError(ValueError):
    """An hf:// input cannot be resolved; the message names the URI and why."""


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse(uri: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (repository id, revision or None for the default branch)."""
    repo, _, revision = uri.removeprefix(SCHEME).partition("@")
    if not is_hub_uri(uri) or not _REPO_ID.fullmatch(repo) or "@" in revision:
        raise HubError(f"{uri}: not a hub model; expected hf://org/name or hf://org/name@revision")
    if uri.endswith("@"):
        raise HubError(f"{uri}: empty revision after '@'")
    return repo, revision or None


def fetch(uri: str) -> Path:
    """The local folder of the repository snapshot ``uri`` names (downloaded unless cached)."""
    repo, revision = parse(uri)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id=repo,
            revision=revision,
            allow_patterns=list(MODEL_FILES),
            token=os.environ.get("HF_TOKEN") or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception as exc:  # network, auth, missing repo or revision, offline cache miss
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        hint = " (HF_HUB_OFFLINE is set: only the local hub cache is searched)" if offline else ""
        raise HubError(f"{uri}: cannot fetch from the hub{hint}: {type(exc).__name__}: {exc}") from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise HubError(f"{uri}: the snapshot has no config.json; not a transformers model")
    return path
