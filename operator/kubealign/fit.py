"""Will a stage fit its GPUs? The operator's early warning, from what the manifest itself says.

Every training stage estimates its memory per device before loading a weight and fails fast on
a GPU too small for it (`kubealign_jobs.memory`, from the model's config.json). The operator
never reads a stage's input model (it has no access to storage), but a run often states the
model's shape itself: a pretrain stage's ``hyperparameters.model``, which every stage
downstream inherits through ``inputs.model.from``. For those stages the operator computes the
same estimate, against the GPU memory of the install (the chart's ``gpuMemory``, env
``KUBEALIGN_GPU_MEMORY``), and the run's ``MemoryFits`` condition (and a Warning Event) names
each stage that plainly cannot fit: before its Job starts, not after its pods crash.

Pure functions of the run; the estimate's own module is stdlib-only, so nothing here imports torch.
"""

from __future__ import annotations

import re
from typing import Any, Final

from kubealign.api import AlignmentRun, Stage
from kubealign.defaults import ENV_GPU_MEMORY
from kubealign_jobs import memory, stages
from kubealign_jobs.config import ConfigError

DEFAULT_GPU_MEMORY: Final = 80 * memory.GIB  # an A100/H100 80 GB
# The training stages, and whether one example is a pair of sequences.
TRAINING: Final = {"pretrain": False, "sft": False, "reward": True, "dpo": True, "ppo": False}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS: Final = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_memory(text: str | None) -> int:
    """Bytes in a Kubernetes-style quantity (``80Gi``, ``40G``, ``1073741824``); the default for None."""
    if text is None:
        return DEFAULT_GPU_MEMORY
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{ENV_GPU_MEMORY}: {text!r} is not a memory quantity such as 80Gi")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def model_config(run: AlignmentRun, stage: Stage) -> dict[str, Any] | None:
    """The model config a stage trains, when the manifest says it: a pretrain stage's, inherited."""
    seen: set[str] = set()
    while stage.type != "pretrain" or stage.inputs.model is not None:
        source = stage.inputs.model
        if source is None or source.from_stage is None or source.from_stage in seen:
            return None  # a URI: only the trainer can read its config.json
        seen.add(stage.name)
        stage = run.spec.stage(source.from_stage)
    try:
        hp = stages.parse_hyperparameters("pretrain", stage.hyperparameters)
    except ConfigError:
        return None  # validation reports it
    # The tokenizer the pretrain stage trains sets the vocabulary, unless the model fixes it.
    return {"vocab_size": hp.vocab_size, **hp.model}


def misfits(run: AlignmentRun, gpu_memory: int) -> tuple[str, ...]:
    """One message per GPU stage whose estimated memory per GPU exceeds ``gpu_memory`` bytes."""
    found = []
    for stage in run.spec.stages:
        pairs = TRAINING.get(stage.type)
        gpus = stage.resources.gpus_per_node
        if pairs is None or gpus < 1:
            continue
        config = model_config(run, stage)
        if config is None:
            continue
        try:
            hp = stages.parse_hyperparameters(stage.type, stage.hyperparameters)
        except ConfigError:
            continue  # validation reports it
        precision = "bf16" if hp.mixed_precision == "auto" else hp.mixed_precision
        estimate = memory.for_stage(
            config, hp, processes=gpus * stage.resources.nodes, mixed_precision=precision, pairs=pairs
        )
        if estimate is None or estimate.total <= gpu_memory:
            continue
        found.append(
            f"stage {stage.name} ({stage.type}) needs about {estimate.describe()} per GPU, more than "
            f"the {gpu_memory / memory.GIB:.0f} GiB of a GPU: shard it (hyperparameters.sharding: "
            "fsdp), train LoRA adapters (hyperparameters.lora), turn on gradient_checkpointing, "
            "or lower max_length / micro_batch_size"
        )
    return tuple(found)
