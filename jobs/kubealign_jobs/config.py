"""The stage-config document: the one contract between the operator and the trainer.

The operator renders one of these per stage (into a ConfigMap mounted at
``/etc/kubealign/stage.json``, or a file under the local runner's workdir); the
trainer reads it with ``python -m kubealign_jobs.<stage> --config <path or URI>``.

This module is imported by both sides, so it uses the standard library only:
no torch, no kopf, no kubernetes client.

Storage layout of one stage (``output`` is ``<run storage>/<namespace>/<run>/<stage>``)::

    <output>/artifact/             the stage's result: a save_pretrained folder or a dataset
    <output>/artifact/_MANIFEST.json   written last; a prefix without it is not an artifact
    <output>/checkpoints/step-00000100/  resumable checkpoints, each with its own manifest
    <output>/metrics.json          final metrics (also summarised in the termination message)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

API_VERSION = "kubealign.io/v1alpha1"
KIND = "StageConfig"

# Where the operator mounts the document, and where the trainer writes its final metrics.
DEFAULT_CONFIG_PATH = "/etc/kubealign/stage.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096

# The evaluate stage's judge server API key (hyperparameters.judge.secretRef), set by the operator.
JUDGE_API_KEY_ENV = "KUBEALIGN_JUDGE_API_KEY"

ARTIFACT_DIR = "artifact"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "_MANIFEST.json"

# The trainer's exit codes, a contract with the operator's podFailurePolicy: EXIT_BAD_INPUT (a
# configuration, data or model error: the same input fails the same way every time) fails the Job
# at once and is never retried; EXIT_STOPPED (SIGTERM: preempted, drained, suspended; a checkpoint
# of the current step was published first) is not a failure, the pod is simply started again;
# every other failure spends one of the stage's retries.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_STOPPED = 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal


class ConfigError(ValueError):
    """A stage-config document is malformed; the message names the field at fault."""


def derive_seed(seed: int, *keys: int) -> int:
    """The seed of one random choice inside a run: ``seed`` mixed with what identifies the choice.

    Every stage derives its seeds here from ``StageConfig.seed`` and, for example, (step, rank),
    (chunk, rank) or (epoch,), so a resumed or retried attempt draws exactly what the first one
    would have, and two choices of one run never share a stream. The result fits torch's 64 bits.
    """
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (1 << 63)
    return value


def artifact_uri(output: str) -> str:
    """The URI of a stage's published result, given the stage's output prefix."""
    return f"{output.rstrip('/')}/{ARTIFACT_DIR}"


def checkpoints_uri(output: str) -> str:
    """The URI under which a stage publishes its resumable checkpoints."""
    return f"{output.rstrip('/')}/{CHECKPOINTS_DIR}"


@dataclass(frozen=True)
class Inputs:
    """Resolved input URIs. Which ones a stage needs depends on its type.

    model:       starting weights (a save_pretrained folder); absent for pretrain from scratch
    data:        the dataset: text corpus, SFT rows, preference rows or prompts
    eval_data:   an optional held-out dataset
    reward_model: a reward stage's artifact (ppo, generate labelling, evaluate)
    reference:   the frozen reference policy (dpo, ppo, evaluate); defaults to ``model``
    policies:    evaluate only: policy name -> artifact URI
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    reward_model: str | None = None
    reference: str | None = None
    policies: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Distributed:
    """torchrun topology; the operator sets the same values as env vars in the pod."""

    nnodes: int = 1
    nproc_per_node: int = 1


@dataclass(frozen=True)
class StorageSettings:
    """How to reach the object store. Credentials are never here: they come from env."""

    endpoint: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs params and per-step metrics (``kubealign_jobs.tracking``); credentials
    come from env (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never from here."""

    mlflow_uri: str | None = None  # http(s)://, or sqlite:///path for a local store; None: no tracking
    experiment: str = "kubealign"
    run_uid: str = ""  # the AlignmentRun's uid: how the stages of one run find their parent MLflow run


@dataclass(frozen=True)
class StageConfig:
    """Everything one stage's trainer needs to know, rendered by the operator."""

    run: str
    stage: str
    type: str
    output: str
    namespace: str = "default"
    inputs: Inputs = field(default_factory=Inputs)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    resume: str | None = None
    storage: StorageSettings = field(default_factory=StorageSettings)
    distributed: Distributed = field(default_factory=Distributed)
    seed: int = 0
    tracking: Tracking = field(default_factory=Tracking)

    @property
    def artifact(self) -> str:
        return artifact_uri(self.output)

    @property
    def checkpoints(self) -> str:
        return self.resume or checkpoints_uri(self.output)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return {"apiVersion": API_VERSION, "kind": KIND, **body}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StageConfig:
        if not isinstance(doc, dict):
            raise ConfigError("stage config: expected a JSON object")
        if doc.get("apiVersion", API_VERSION) != API_VERSION:
            raise ConfigError(f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}")
        if doc.get("kind", KIND) != KIND:
            raise ConfigError(f"kind: expected {KIND!r}, got {doc.get('kind')!r}")
        for name in ("run", "stage", "type", "output"):
            if not isinstance(doc.get(name), str) or not doc[name]:
                raise ConfigError(f"{name}: required non-empty string")
        # The catalogue imports this module (for ConfigError), so it is imported here, not at the top.
        from kubealign_jobs.stages import stage_type

        stage_type(doc["type"])
        inputs = _sub(doc, "inputs", Inputs)
        if not isinstance(inputs.policies, dict):
            raise ConfigError("inputs.policies: expected an object of name -> URI")
        hyperparameters = doc.get("hyperparameters") or {}
        if not isinstance(hyperparameters, dict):
            raise ConfigError("hyperparameters: expected an object")
        return cls(
            run=doc["run"],
            stage=doc["stage"],
            type=doc["type"],
            output=doc["output"],
            namespace=str(doc.get("namespace", "default")),
            inputs=inputs,
            hyperparameters=hyperparameters,
            resume=doc.get("resume"),
            storage=_sub(doc, "storage", StorageSettings),
            distributed=_sub(doc, "distributed", Distributed),
            seed=int(doc.get("seed", 0)),
            tracking=_sub(doc, "tracking", Tracking),
        )

    @classmethod
    def from_json(cls, text: str) -> StageConfig:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"stage config: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
        return cls.from_dict(doc)


def _sub(doc: dict[str, Any], name: str, kind: type[T]) -> T:
    value = doc.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected an object")
    known = set(kind.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    return kind(**value)
