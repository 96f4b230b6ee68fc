"""The stage catalogue: every stage type defined once, read by the operator and the trainers alike.

One ``StageType`` entry per stage names its trainer module, its hyperparameter dataclass, the
inputs it requires and accepts, the kind of artifact it publishes and whether it needs a reward.
Everything else derives from here: ``kubealign validate`` and the operator's ``Valid`` condition
(``kubealign.api``), the CEL rules in the CRD (``kubealign.crdgen``), the stage-config document
(``kubealign.render``), the trainer's own check when its pod starts (``runtime.run_stage``) and
``kubealign stages [TYPE]``.

Adding a stage type is one trainer module ``kubealign_jobs/<name>.py`` (whose ``main`` calls
``runtime.run_stage``) plus one entry in ``CATALOGUE`` below; ``tools/sync_chart.py`` then
regenerates the CRD's rules and the tests check that nothing drifted.

Standard library only: the operator imports this module, and it never imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kubealign_jobs.config import ConfigError

# ---------------------------------------------------------------------------- declaring a hyperparameter


def param(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with its one-line description and the bounds every door checks.

    Mutable defaults (dicts, lists) are copied per instance. A subclass that only changes a
    default writes ``name: type = value``; the description and bounds are inherited.
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Kind(enum.StrEnum):
    """The JSON type of a hyperparameter, as the CRD's rules and ``kubealign stages`` name it."""

    BOOL = "boolean"
    INT = "integer"
    FLOAT = "number"
    STR = "string"
    OBJECT = "object"
    NUMBERS = "list of numbers"


@dataclass(frozen=True)
class Param:
    """One hyperparameter of one stage type, everything a door needs to check it."""

    name: str
    kind: Kind
    default: Any
    doc: str
    nullable: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def constraint(self) -> str:
        """The bounds or choices in words, e.g. ``>= 1`` or ``one of cosine, linear, constant``."""
        parts = [
            f"{op} {_number(bound)}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        if self.choices:
            parts.append(f"one of {', '.join(self.choices)}")
        text = " and ".join(parts)
        if self.nullable:
            return f"{text}, or null" if text else "or null"
        return text

    def check(self, value: Any) -> Any:
        """``value`` as the dataclass field wants it; ``ConfigError`` naming ``hyperparameters.<name>``."""
        where = f"hyperparameters.{self.name}"
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{where}: must not be null ({self.describe_type()})")
        checked = _check_kind(where, value, self.kind)
        if self.choices is not None and checked not in self.choices:
            hint = _suggest(str(checked), self.choices)
            raise ConfigError(f"{where}: {checked!r} is not one of {', '.join(self.choices)}{hint}")
        values = checked if self.kind is Kind.NUMBERS else [checked]
        if self.kind in (Kind.INT, Kind.FLOAT, Kind.NUMBERS):
            for index, number in enumerate(values):
                if not _in_bounds(number, self):
                    at = f"{where}[{index}]" if self.kind is Kind.NUMBERS else where
                    raise ConfigError(f"{at}: must be {self.constraint()}, got {_number(number)}")
        return checked

    def describe_type(self) -> str:
        return f"{self.kind.value}{' or null' if self.nullable else ''}"


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _in_bounds(value: float, p: Param) -> bool:
    return not (
        (p.ge is not None and value < p.ge)
        or (p.gt is not None and value <= p.gt)
        or (p.le is not None and value > p.le)
        or (p.lt is not None and value >= p.lt)
        or (isinstance(value, float) and not math.isfinite(value))
    )


def _check_kind(where: str, value: Any, kind: Kind) -> Any:
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is Kind.STR:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is Kind.OBJECT:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
    return [_check_kind(f"{where}[{i}]", v, Kind.FLOAT) for i, v in enumerate(value)]


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


_KINDS: Final[Mapping[Any, Kind]] = {
    bool: Kind.BOOL,
    int: Kind.INT,
    float: Kind.FLOAT,
    str: Kind.STR,
    dict: Kind.OBJECT,
    list: Kind.NUMBERS,
}


@functools.cache
def params(hyperparameters: type) -> tuple[Param, ...]:
    """The declared hyperparameters of a catalogue dataclass, in declaration order (computed once)."""
    hints = typing.get_type_hints(hyperparameters)
    out = []
    for f in dataclasses.fields(hyperparameters):
        hint = hints[f.name]
        nullable = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            options = [o for o in typing.get_args(hint) if o is not type(None)]
            nullable, hint = True, options[0]
        kind = _KINDS[typing.get_origin(hint) or hint]
        metadata = _metadata(hyperparameters, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(
            Param(
                name=f.name,
                kind=kind,
                default=default,
                doc=metadata["doc"],
                nullable=nullable,
                ge=metadata["ge"],
                gt=metadata["gt"],
                le=metadata["le"],
                lt=metadata["lt"],
                choices=metadata["choices"],
            )
        )
    return tuple(out)


def _metadata(cls: type, name: str) -> Mapping[str, Any]:
    """The ``param(...)`` metadata of ``name``: from the class that declared it, however far up."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and "doc" in declared.metadata:
            metadata: Mapping[str, Any] = declared.metadata
            return metadata
    raise TypeError(f"{cls.__name__}.{name}: declare it with stages.param(default, doc)")


# ---------------------------------------------------------------------------- shared bases

MIXED_PRECISION: Final = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES: Final = ("cosine", "linear", "constant")
KL_ESTIMATORS: Final = ("k1", "k2", "k3")
OUTPUT_FORMATS: Final = ("best_worst", "all_pairs", "ranking")
BASELINES: Final = ("reference", "data")
DPO_LOSS_TYPES: Final = ("sigmoid", "robust", "ipo", "hinge", "simpo")
ADVANTAGES: Final = ("grpo", "rloo")  # kubealign_jobs.rl.group_advantages
VERIFIERS: Final = ("exact_match", "math", "regex")  # kubealign_jobs.verifiers
SHARDINGS: Final = ("none", "fsdp")
VALUE_MODELS: Final = ("head", "separate")
# The ground-truth scorers kubealign_jobs.scorers registers (a test keeps the two in step).
SCORERS: Final = ("vader", "word_fraction")


@dataclass(frozen=True)
class PrecisionHyperparameters:
    """What every stage has: the numeric precision of its forward passes."""

    mixed_precision: str = param(
        "auto", "autocast dtype: auto is bf16 on GPUs that support it, else fp32", choices=MIXED_PRECISION
    )


@dataclass(frozen=True)
class OptimizerHyperparameters(PrecisionHyperparameters):
    """AdamW and its schedule: the same knobs for every stage that trains."""

    learning_rate: float = param(1e-5, "peak AdamW learning rate", gt=0)
    weight_decay: float = param(0.0, "AdamW weight decay (never on biases and norm weights)", ge=0)
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = param(0.999, "AdamW beta2", ge=0, lt=1)
    warmup_steps: int = param(0, "optimizer steps of linear warmup from 0", ge=0)
    lr_schedule: str = param("cosine", "shape of the decay after warmup", choices=LR_SCHEDULES)
    min_lr_ratio: float = param(0.1, "cosine/linear decay ends at this fraction of learning_rate", ge=0, le=1)
    grad_clip: float = param(1.0, "clip the global gradient norm to this; 0 disables clipping", ge=0)


@dataclass(frozen=True)
class CheckpointHyperparameters:
    """Logging and resumable checkpoints."""

    log_every: int = param(10, "optimizer steps between progress records", ge=1)
    checkpoint_every: int = param(100, "optimizer steps between resumable checkpoints; 0 disables them", ge=0)
    keep_checkpoints: int = param(2, "newest checkpoints kept in storage", ge=1)


@dataclass(frozen=True)
class ShardingHyperparameters:
    """How the trained model is laid out over the stage's processes."""

    sharding: str = param(
        "none",
        "none: every process holds the whole model (DDP); fsdp: parameters, gradients and optimizer "
        "state sharded over all processes (FSDP2, one unit per decoder layer)",
        choices=SHARDINGS,
    )
    cpu_offload: bool = param(
        False, "fsdp only: keep the sharded parameters, gradients and optimizer state in CPU memory"
    )

    def check_sharding(self) -> None:
        if self.cpu_offload and self.sharding != "fsdp":
            raise ConfigError("hyperparameters.cpu_offload: needs sharding: fsdp")


@dataclass(frozen=True)
class TrainingHyperparameters(OptimizerHyperparameters, CheckpointHyperparameters, ShardingHyperparameters):
    """Defaults shared by the stages that run the shared training loop (pretrain, sft, reward, dpo)."""

    max_steps: int = param(0, "optimizer steps to train; 0 trains for `epochs` epochs", ge=0)
    epochs: float = param(1.0, "passes over the data when max_steps is 0", ge=0)
    batch_size: int = param(8, "examples per optimizer step, across all processes", ge=1)
    micro_batch_size: int = param(
        0, "examples per process and forward pass; 0 is batch_size / processes (no accumulation)", ge=0
    )
    max_length: int = param(512, "tokens per sequence (prompt + completion); longer ones are cut", ge=1)
    eval_every: int = param(0, "optimizer steps between evaluations; 0 evaluates only at the end", ge=0)
    gradient_checkpointing: bool = param(False, "recompute activations in backward: less memory, ~30% slower")

    def __post_init__(self) -> None:
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("hyperparameters.epochs: must be > 0 when max_steps is 0")
        self.check_sharding()
        if isinstance(self, LoraHyperparameters):
            self.check_lora()


@dataclass(frozen=True)
class LoraSettings:
    """The ``lora`` hyperparameter, checked: adapters of rank ``r`` on ``target_modules``.

    The update of a targeted weight W is (alpha / r) * B @ A with A (r x in) and B (out x r);
    B starts at zero, so training starts exactly at the base model.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


LORA_KEYS: Final = ("r", "alpha", "dropout", "target_modules")


def _refuse_unknown(value: Mapping[str, Any], known: Sequence[str], *, where: str, what: str) -> None:
    """A ConfigError naming ``<where>.<key>`` for the first key of a nested setting not in ``known``."""
    for key in value:
        if key not in known:
            hint = _suggest(key, known) or f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}.{key}: unknown {what}{hint}")


def lora_settings(value: Mapping[str, Any]) -> LoraSettings:
    """``hyperparameters.lora`` as `LoraSettings`; ``ConfigError`` naming ``hyperparameters.lora.<key>``."""
    where = "hyperparameters.lora"
    _refuse_unknown(value, LORA_KEYS, where=where, what="LoRA setting")
    settings = LoraSettings()
    r = value.get("r", settings.r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}.r: expected an integer >= 1, got {r!r}")
    alpha = value.get("alpha", settings.alpha)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise ConfigError(f"{where}.alpha: expected a number > 0, got {alpha!r}")
    dropout = value.get("dropout", settings.dropout)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"{where}.dropout: expected a number >= 0 and < 1, got {dropout!r}")
    targets = value.get("target_modules", settings.target_modules)
    if targets != "all-linear":
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f'{where}.target_modules: expected "all-linear" or a non-empty list of module names '
                f"(e.g. [q_proj, v_proj]), got {targets!r}"
            )
        targets = tuple(targets)
    return LoraSettings(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets)


JUDGE_TEMPLATES: Final = ("dialogue", "summarization")
JUDGE_KEYS: Final = (
    "endpoint",
    "model",
    "secretRef",
    "template",
    "max_concurrency",
    "max_retries",
    "timeout_seconds",
    "max_tokens",
    "length_controlled",
)


@dataclass(frozen=True)
class JudgeSettings:
    """The evaluate stage's ``judge``: pairwise verdicts from an OpenAI-compatible chat server
    (``endpoint`` + ``model``, its key from ``secretRef``) or from a model loaded in the pod
    (``model: {uri: ...}``, or ``{from: <stage>}``: an earlier stage's model). ``template`` is
    ``dialogue``, ``summarization`` or a prompt of your own with ``{query}``, ``{answer_a}`` and
    ``{answer_b}`` (kubealign_jobs.judge)."""

    endpoint: str | None = None
    model: str | None = None  # the served model's name, with endpoint
    model_uri: str | None = None  # an in-pod judge: a model folder, .gguf or hf:// URI
    model_from: str | None = None  # an in-pod judge: an earlier stage's model, before rendering
    secret_name: str | None = None
    secret_key: str = "apiKey"
    template: str = "dialogue"
    max_concurrency: int = 4
    max_retries: int = 4
    timeout_seconds: float = 60.0
    max_tokens: int = 128
    length_controlled: bool = False


def judge_settings(value: Mapping[str, Any]) -> JudgeSettings:
    """``hyperparameters.judge`` as `JudgeSettings`; a ConfigError names ``hyperparameters.judge.<key>``."""
    where = "hyperparameters.judge"
    _refuse_unknown(value, JUDGE_KEYS, where=where, what="judge setting")
    model = value.get("model")
    endpoint = value.get("endpoint")
    model_uri = model_from = None
    if isinstance(model, Mapping):
        source = model.get("uri", model.get("from"))
        if len(model) != 1 or not set(model) <= {"uri", "from"} or not isinstance(source, str) or not source:
            raise ConfigError(f"{where}.model: an in-pod judge is {{uri: <model URI>}} or {{from: <stage>}}")
        if endpoint is not None:
            raise ConfigError(f"{where}.model: with an endpoint, model is the served model's name")
        # A ``from`` is resolved to that stage's artifact URI by the operator (and the local runner).
        model_uri, model_from, model = model.get("uri"), model.get("from"), None
    elif endpoint is None:
        raise ConfigError(
            f"{where}: set endpoint and model (a chat server), or model: {{uri: ...}} (in the pod)"
        )
    else:
        if not isinstance(endpoint, str) or not re.match(r"^https?://\S+$", endpoint):
            raise ConfigError(
                f"{where}.endpoint: expected an http(s):// base URL such as http://vllm:8000/v1"
            )
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}.model: the model name the server serves, a non-empty string")
    secret = value.get("secretRef")
    if secret is not None and (not isinstance(secret, Mapping) or not isinstance(secret.get("name"), str)):
        raise ConfigError(f"{where}.secretRef: expected {{name: <Secret>, key: <key, default apiKey>}}")
    template = value.get("template", "dialogue")
    if not isinstance(template, str) or not (
        template in JUDGE_TEMPLATES or all(f"{{{k}}}" in template for k in ("query", "answer_a", "answer_b"))
    ):
        raise ConfigError(
            f"{where}.template: {' or '.join(JUDGE_TEMPLATES)}, or a prompt containing "
            "{query}, {answer_a} and {answer_b}"
        )
    numbers: dict[str, Any] = {}
    for key, kind, low in (
        ("max_concurrency", int, 1),
        ("max_retries", int, 0),
        ("max_tokens", int, 1),
        ("timeout_seconds", float, 0),
    ):
        if key not in value:
            continue
        number = value[key]
        ok = not isinstance(number, bool) and isinstance(number, int if kind is int else int | float)
        if not ok or number < low or (kind is float and number <= 0):
            bound = f"> {low}" if kind is float else f">= {low}"
            raise ConfigError(
                f"{where}.{key}: expected {'an integer' if kind is int else 'a number'} {bound}"
            )
        numbers[key] = kind(number)
    length_controlled = value.get("length_controlled", False)
    if not isinstance(length_controlled, bool):
        raise ConfigError(f"{where}.length_controlled: expected true or false")
    return JudgeSettings(
        endpoint=endpoint,
        model=model,
        model_uri=model_uri,
        model_from=model_from,
        secret_name=secret["name"] if secret else None,
        secret_key=str(secret.get("key") or "apiKey") if secret else "apiKey",
        template=template,
        length_controlled=length_controlled,
        **numbers,
    )


@dataclass(frozen=True)
class LoraHyperparameters:
    """Parameter-efficient fine-tuning: train low-rank adapters (and any head) instead of the weights."""

    lora: dict[str, Any] | None = param(
        None,
        "LoRA adapters {r: 8, alpha: 16, dropout: 0, target_modules: all-linear | [names]}; "
        "null trains every weight",
    )
    lora_merge: bool = param(
        True,
        "with lora: publish base + adapters merged (plain transformers); false: the adapter alone (peft)",
    )

    @property
    def lora_settings(self) -> LoraSettings | None:
        return None if self.lora is None else lora_settings(self.lora)

    def check_lora(self) -> None:
        if self.lora is not None:
            lora_settings(self.lora)
        elif not self.lora_merge:
            raise ConfigError("hyperparameters.lora_merge: false needs lora (there is no adapter to publish)")


@dataclass(frozen=True)
class RewardSourceHyperparameters:
    """Where a stage's reward comes from besides ``inputs.rewardModel``: a named ground-truth scorer."""

    scorer: str | None = param(
        None,
        "ground-truth scorer by name; without inputs.rewardModel it is the reward, with one it is "
        "reported beside it",
        choices=SCORERS,
    )
    scorer_options: dict[str, Any] = param({}, "options of the scorer (see kubealign_jobs.scorers)")
    reward_max_length: int = param(512, "tokens of prompt + completion the reward model sees", ge=1)


# ---------------------------------------------------------------------------- per stage type


@dataclass(frozen=True)
class PretrainHyperparameters(TrainingHyperparameters):
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    batch_size: int = 32
    warmup_steps: int = 100
    block_size: int = param(256, "tokens per packed training sequence", ge=2)
    document_attention: bool = param(
        False,
        "keep attention inside each document of a packed block (positions restart at each bos); "
        "off: a block is one stream, as GPT-2 trained",
    )
    vocab_size: int = param(8000, "size of the tokenizer trained when there is no input model", ge=256)
    tokenizer_min_frequency: int = param(2, "minimum count of a merge in the trained tokenizer", ge=1)
    model: dict[str, Any] = param(
        {
            "arch": "llama",
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
        },
        "architecture of a new model (arch llama or gpt2 plus its config fields); replaces the default whole",
    )


@dataclass(frozen=True)
class SFTHyperparameters(TrainingHyperparameters, LoraHyperparameters):
    learning_rate: float = 2e-5
    batch_size: int = 32
    epochs: float = 3.0
    warmup_steps: int = 10
    preferred_ft: bool = param(
        False, "data are preference rows; train on prompt + chosen (the DPO paper's Preferred-FT)"
    )
    packing: bool = param(
        False,
        "lay each micro-batch's sequences end to end in one row, positions restarting and attention "
        "kept inside each: no compute on padding, the same loss",
    )


@dataclass(frozen=True)
class RewardHyperparameters(TrainingHyperparameters, LoraHyperparameters):
    batch_size: int = 32
    eval_fraction: float = param(
        0.1,
        "fraction of the prompts whose pairs are held out for accuracy when there is no inputs.evalData",
        ge=0,
        lt=1,
    )
    disable_dropout: bool = param(True, "turn dropout off so the two answers of a pair are scored alike")


@dataclass(frozen=True)
class ReferenceHyperparameters(TrainingHyperparameters, LoraHyperparameters):
    """A policy trained against the log-probs of a frozen reference, computed once and cached."""

    reference_batch_size: int = param(0, "sequences per reference forward pass; 0 is 4 x micro-batch", ge=0)
    disable_dropout: bool = param(True, "turn dropout off: the log-ratios must compare like with like")


@dataclass(frozen=True)
class DPOHyperparameters(ReferenceHyperparameters):
    """The DPO paper's settings: beta 0.1, lr 1e-6, batch 64, 150 warmup steps."""

    learning_rate: float = 1e-6
    batch_size: int = 64
    warmup_steps: int = 150
    lr_schedule: str = "constant"
    beta: float = param(0.1, "strength of the KL constraint to the reference (the paper's beta)", gt=0)
    loss_type: str = param(
        "sigmoid",
        "the preference loss: sigmoid (DPO), robust (Chowdhury 2024), ipo (Azar 2023), hinge (SLiC), "
        "simpo (Meng 2024: reference-free, length-normalised; no reference is loaded)",
        choices=DPO_LOSS_TYPES,
    )
    label_smoothing: float = param(
        0.0,
        "assumed rate of flipped labels: conservative DPO with sigmoid (Mitchell 2023), robust DPO with "
        "robust, smoothed SimPO with simpo",
        ge=0,
        lt=0.5,
    )
    gamma: float = param(0.5, "simpo's target reward margin", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ConfigError(
                f"hyperparameters.label_smoothing: {self.loss_type} has no label smoothing; "
                "use sigmoid, robust or simpo"
            )


@dataclass(frozen=True)
class KTOHyperparameters(ReferenceHyperparameters):
    """KTO's settings (Ethayarajh et al. 2024): beta 0.1, equal weights for balanced labels."""

    learning_rate: float = 1e-6
    batch_size: int = 32
    lr_schedule: str = "constant"
    beta: float = param(0.1, "strength of the KL constraint to the reference", gt=0)
    desirable_weight: float = param(
        1.0, "loss weight of desirable answers (raise it when they are the minority)", gt=0
    )
    undesirable_weight: float = param(1.0, "loss weight of undesirable answers", gt=0)


@dataclass(frozen=True)
class SamplingHyperparameters:
    """How a stage samples completions."""

    max_new_tokens: int = param(64, "tokens sampled per completion", ge=1)
    top_p: float = param(1.0, "nucleus sampling: keep the smallest token set of this probability", gt=0, le=1)
    max_prompt_tokens: int = param(256, "prompts are cut to their last this many tokens", ge=1)


@dataclass(frozen=True)
class GenerateHyperparameters(PrecisionHyperparameters, RewardSourceHyperparameters, SamplingHyperparameters):
    samples_per_prompt: int = param(4, "answers sampled per prompt (K); a preference needs 2", ge=2)
    temperature: float = param(1.0, "sampling temperature; 0 is greedy decoding", ge=0)
    top_k: int = param(0, "sample from the k most likely tokens; 0 disables top-k", ge=0)
    batch_size: int = param(64, "sequences per generate call (prompts x K)", ge=1)
    max_prompts: int = param(0, "prompts to use; 0 is every prompt in inputs.data", ge=0)
    output_format: str = param("best_worst", "which pairs or rankings to write", choices=OUTPUT_FORMATS)
    min_margin: float = param(0.0, "a pair needs chosen_score - rejected_score above this", ge=0)
    chunk_prompts: int = param(256, "prompts per resumable chunk", ge=1)

    @property
    def output_file(self) -> str:
        return "rankings.jsonl" if self.output_format == "ranking" else "preferences.jsonl"


@dataclass(frozen=True)
class RolloutHyperparameters(OptimizerHyperparameters, CheckpointHyperparameters, SamplingHyperparameters):
    """What the on-policy stages (ppo, grpo) share: steps of one rollout and its update."""

    lr_schedule: str = "constant"
    log_every: int = 1
    checkpoint_every: int = 50
    max_new_tokens: int = 32
    max_prompt_tokens: int = 128
    steps: int = param(100, "optimisation steps, each one rollout and its update", ge=1)
    temperature: float = param(1.0, "the policy is pi^(1/T); log-probs are taken at the same T", gt=0)
    forward_batch_size: int = param(64, "rows per sampling call or no-grad forward pass over a rollout", ge=1)


@dataclass(frozen=True)
class PPOHyperparameters(
    RolloutHyperparameters, RewardSourceHyperparameters, ShardingHyperparameters, LoraHyperparameters
):
    """Defaults follow TRL's PPO and Ziegler et al."""

    # Rollouts.
    rollout_batch_size: int = param(16, "prompts per process per step", ge=1)
    missing_eos_penalty: float | None = param(
        None, "subtracted from the score of completions cut at max_new_tokens"
    )
    # The update.
    ppo_epochs: int = param(4, "passes over each rollout batch", ge=1)
    mini_batch_size: int = param(8, "rows per optimizer step, per process; divides rollout_batch_size", ge=1)
    clip_range: float = param(0.2, "PPO ratio clip epsilon", gt=0)
    clip_range_value: float = param(0.2, "value-function clip around the old values", gt=0)
    value_loss_coef: float = param(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = param(0.0, "weight of the entropy bonus", ge=0)
    gamma: float = param(1.0, "discount factor", ge=0, le=1)
    lam: float = param(0.95, "GAE lambda", ge=0, le=1)
    whiten_rewards: bool = param(
        False, "whiten the scores of each rollout batch (needs rollout_batch_size >= 2)"
    )
    # The KL penalty: fixed beta, or adaptive towards target_kl.
    init_kl_coef: float = param(0.05, "beta of the per-token KL penalty (its start when adaptive)", ge=0)
    target_kl: float | None = param(
        None, "adapt beta towards this KL per sequence in nats (Ziegler et al.); null keeps it fixed", gt=0
    )
    kl_horizon: int = param(10000, "samples over which the adaptive controller moves beta", ge=1)
    kl_estimator: str = param("k1", "per-token KL estimator (Schulman's k1, k2 or k3)", choices=KL_ESTIMATORS)
    gradient_checkpointing: bool = param(
        False, "recompute activations in the update's backward: less memory, ~30% slower"
    )
    value_model: str = param(
        "head",
        "head: a scalar head on the policy's last hidden state (one backbone); separate: a critic of "
        "its own, a sequence classifier initialised from inputs.rewardModel if given, else from the "
        "policy (InstructGPT's and TRL's layout: twice the compute)",
        choices=VALUE_MODELS,
    )

    def __post_init__(self) -> None:
        self.check_sharding()
        self.check_lora()
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"hyperparameters.mini_batch_size: {self.mini_batch_size} does not divide "
                f"rollout_batch_size ({self.rollout_batch_size})"
            )
        if self.whiten_rewards and self.rollout_batch_size < 2:
            raise ConfigError("hyperparameters.whiten_rewards: needs rollout_batch_size >= 2")


@dataclass(frozen=True)
class GRPOHyperparameters(RolloutHyperparameters):
    """Group-relative policy optimisation (Shao et al. 2024); TRL's GRPO defaults where it has them."""

    learning_rate: float = 1e-6
    prompts_per_step: int = param(8, "prompts per process per step; each is answered group_size times", ge=1)
    group_size: int = param(4, "completions sampled per prompt (G); advantages compare them", ge=2)
    advantage: str = param(
        "grpo", "baseline: grpo (the group's mean) or rloo (the mean of the other G - 1)", choices=ADVANTAGES
    )
    scale_rewards: bool = param(True, "divide advantages by the group's reward standard deviation")
    epochs: int = param(1, "passes over each rollout (GRPO's mu); with 1 the ratio starts at exactly 1", ge=1)
    mini_batch_size: int = param(
        0, "completions per optimizer step, per process; 0 is the whole rollout (one step per pass)", ge=0
    )
    clip_range: float = param(0.2, "ratio clip epsilon", gt=0)
    kl_coef: float = param(0.0, "weight of the k3 KL to the reference; 0 loads no reference", ge=0)
    verifiers: dict[str, Any] = param(
        {}, "verifiable rewards by name and weight, e.g. {exact_match: 1.0}: exact_match, math, regex"
    )
    regex: str | None = param(None, "the regex verifier's pattern; {answer} stands for the row's answer")
    reward_model_weight: float = param(1.0, "weight of inputs.rewardModel's score, when there is one", ge=0)
    reward_max_length: int = param(512, "tokens of prompt + completion the reward model sees", ge=1)

    def __post_init__(self) -> None:
        for name, weight in self.verifiers.items():
            if name not in VERIFIERS:
                raise ConfigError(
                    f"hyperparameters.verifiers.{name}: unknown verifier; one of {', '.join(VERIFIERS)}"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(
                    f"hyperparameters.verifiers.{name}: the weight must be a number, got {weight!r}"
                )
        if ("regex" in self.verifiers) != (self.regex is not None):
            raise ConfigError("hyperparameters.regex: set it exactly when verifiers has regex")
        rollout = self.prompts_per_step * self.group_size
        if self.mini_batch_size and rollout % self.mini_batch_size:
            raise ConfigError(
                f"hyperparameters.mini_batch_size: {self.mini_batch_size} does not divide the rollout "
                f"of prompts_per_step x group_size = {rollout} completions"
            )


@dataclass(frozen=True)
class EvaluateHyperparameters(PrecisionHyperparameters, RewardSourceHyperparameters, SamplingHyperparameters):
    temperatures: list[float] = param(
        [0.25, 0.5, 0.75, 1.0], "sampling temperatures of the frontier; 0 is greedy", ge=0
    )
    samples_per_prompt: int = param(1, "answers per prompt per policy and temperature", ge=1)
    batch_size: int = param(64, "sequences per generate or scoring call", ge=1)
    max_prompts: int = param(0, "eval prompts to use; 0 is all", ge=0)
    best_of_n: int = param(4, "N of the Best-of-N baseline; 0 disables it", ge=0)
    baseline: str = param(
        "reference", "win rates against the reference's answers or the data's", choices=BASELINES
    )
    plot: bool = param(True, "draw the reward-KL frontier as frontier.png")
    show_answers: int = param(
        4, "answers per policy and temperature kept in results.json beside the numbers", ge=0
    )
    judge: dict[str, Any] | None = param(
        None,
        "pairwise win rates from a judge model: {endpoint, model, secretRef} (an OpenAI-compatible "
        "chat server) or {model: {uri | from}} (loaded in the pod); template: dialogue | summarization | "
        "your own; max_concurrency, max_retries, timeout_seconds, max_tokens, length_controlled",
    )

    @property
    def judge_settings(self) -> JudgeSettings | None:
        return None if self.judge is None else judge_settings(self.judge)

    def __post_init__(self) -> None:
        if self.judge is not None:
            judge_settings(self.judge)  # checked here: at every door that parses hyperparameters
        if not self.temperatures:
            raise ConfigError("hyperparameters.temperatures: needs at least one temperature")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ConfigError(f"hyperparameters.temperatures: repeated values in {self.temperatures}")
        if self.best_of_n == 1:
            raise ConfigError("hyperparameters.best_of_n: must be 0 (off) or >= 2, got 1")


# ---------------------------------------------------------------------------- the catalogue


class Artifact(enum.StrEnum):
    """What a stage publishes under ``<output>/artifact``, and so which inputs it can feed."""

    MODEL = "model"
    REWARD_MODEL = "reward model"
    DATASET = "dataset"
    REPORT = "report"


@dataclass(frozen=True)
class Role:
    """One input role: its key in the API (camelCase) and the StageConfig field it becomes."""

    key: str
    attr: str
    accepts: Artifact | None  # what a ``from`` must produce; None: only URIs (nothing produces it)
    doc: str


ROLES: Final[Mapping[str, Role]] = {
    role.key: role
    for role in (
        Role("model", "model", Artifact.MODEL, "starting weights (a save_pretrained folder)"),
        Role("data", "data", Artifact.DATASET, "the dataset: corpus, SFT rows, preference rows or prompts"),
        Role("evalData", "eval_data", Artifact.DATASET, "a held-out dataset"),
        Role("rewardModel", "reward_model", Artifact.REWARD_MODEL, "a reward stage's artifact"),
        Role("reference", "reference", Artifact.MODEL, "the frozen reference policy; defaults to model"),
        Role("policies", "policies", Artifact.MODEL, "the policies an evaluate stage compares"),
    )
}


@dataclass(frozen=True)
class StageType:
    """One stage type: everything the operator, the trainers and the docs need to know about it.

    requires: groups of input roles; each group needs at least one of its roles, with why
    optional: the other roles it reads; any role in neither is refused
    needs_reward: at least one of ``inputs.rewardModel`` and ``hyperparameters.scorer``
    """

    name: str
    summary: str
    hyperparameters: type
    requires: tuple[tuple[tuple[str, ...], str], ...]
    optional: tuple[str, ...]
    produces: Artifact
    needs_reward: bool = False

    @property
    def module(self) -> str:
        return f"kubealign_jobs.{self.name}"

    @property
    def params(self) -> tuple[Param, ...]:
        return params(self.hyperparameters)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every input role this stage reads, in ROLES order."""
        wanted = {role for group, _ in self.requires for role in group} | set(self.optional)
        return tuple(role for role in ROLES if role in wanted)

    @property
    def article(self) -> str:
        """For messages: "an sft stage", "a ppo stage" (by how the name is said)."""
        return "an" if self.name[0] in "aeios" else "a"


CATALOGUE: Final[Mapping[str, StageType]] = {
    stage.name: stage
    for stage in (
        StageType(
            name="pretrain",
            summary="next-token prediction on a text corpus, packed into fixed-length blocks",
            hyperparameters=PretrainHyperparameters,
            requires=((("data",), "the text corpus"),),
            optional=("model", "evalData"),
            produces=Artifact.MODEL,
        ),
        StageType(
            name="sft",
            summary="supervised fine-tuning on the response tokens of instruction rows",
            hyperparameters=SFTHyperparameters,
            requires=((("model",), "the model to fine-tune"), (("data",), "instruction rows")),
            optional=("evalData",),
            produces=Artifact.MODEL,
        ),
        StageType(
            name="generate",
            summary="sample K answers per prompt, label them, write preference pairs or rankings",
            hyperparameters=GenerateHyperparameters,
            requires=((("model",), "the policy to sample from"), (("data",), "prompts")),
            optional=("rewardModel",),
            produces=Artifact.DATASET,
            needs_reward=True,
        ),
        StageType(
            name="reward",
            summary="a scalar reward model fitted to preferences (Bradley-Terry / Plackett-Luce)",
            hyperparameters=RewardHyperparameters,
            requires=((("model",), "the backbone, usually the SFT model"), (("data",), "preference pairs")),
            optional=("evalData",),
            produces=Artifact.REWARD_MODEL,
        ),
        StageType(
            name="dpo",
            summary="Direct Preference Optimization on preference pairs",
            hyperparameters=DPOHyperparameters,
            requires=((("model",), "the policy to start from"), (("data",), "preference pairs")),
            optional=("reference", "evalData"),
            produces=Artifact.MODEL,
        ),
        StageType(
            name="kto",
            summary="Kahneman-Tversky Optimization on unpaired answers labelled desirable or not",
            hyperparameters=KTOHyperparameters,
            requires=(
                (("model",), "the policy to start from"),
                (("data",), "rows {prompt, completion, label}"),
            ),
            optional=("reference",),
            produces=Artifact.MODEL,
        ),
        StageType(
            name="ppo",
            summary="PPO against a reward under a KL penalty to a frozen reference",
            hyperparameters=PPOHyperparameters,
            requires=((("model",), "the policy to start from"), (("data",), "prompts")),
            optional=("rewardModel", "reference"),
            produces=Artifact.MODEL,
            needs_reward=True,
        ),
        StageType(
            name="grpo",
            summary="group-relative policy optimisation against verifiable rewards and/or a reward model",
            hyperparameters=GRPOHyperparameters,
            requires=(
                (("model",), "the policy to start from"),
                (("data",), "prompts, with an answer per row for the verifiers"),
            ),
            optional=("rewardModel", "reference", "evalData"),
            produces=Artifact.MODEL,
        ),
        StageType(
            name="evaluate",
            summary="win rates and the reward-KL frontier of policies against a reference",
            hyperparameters=EvaluateHyperparameters,
            requires=(
                (("policies", "model"), "the policies to compare (inputs.policies or inputs.model)"),
                (("reference", "model"), "the reference policy"),
                (("evalData", "data"), "eval prompts"),
            ),
            optional=("rewardModel",),
            produces=Artifact.REPORT,
            needs_reward=True,
        ),
    )
}

STAGE_TYPES: Final = tuple(CATALOGUE)


def stage_type(name: str) -> StageType:
    """The catalogue entry of ``name``; ``ConfigError`` naming the field for an unknown type."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise ConfigError(f"type: {name!r} is not one of {', '.join(STAGE_TYPES)}{_suggest(name, CATALOGUE)}")
    return entry


def producers(artifact: Artifact) -> tuple[str, ...]:
    """The stage types whose artifact is ``artifact``."""
    return tuple(name for name, entry in CATALOGUE.items() if entry.produces is artifact)


def reward_message(entry: StageType) -> str:
    """The one reward-source rule, in the words every door uses."""
    return (
        f"{entry.article} {entry.name} stage needs a reward: inputs.rewardModel (a reward stage or a "
        "reward model URI) or hyperparameters.scorer (a ground-truth scorer), or both"
    )


def needs_message(entry: StageType, group: tuple[str, ...], why: str) -> str:
    """The message of one required-input group, e.g. ``a dpo stage needs inputs.data (preference pairs)``."""
    roles = " or ".join(f"inputs.{role}" for role in group)
    return f"{entry.article} {entry.name} stage needs {roles} ({why})"


# ---------------------------------------------------------------------------- checking values


def _check_fields(entry: StageType, values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Each value as its field wants it, and "hyperparameters.<name>: reason" for every bad one."""
    declared = {p.name: p for p in entry.params}
    checked: dict[str, Any] = {}
    errors: list[str] = []
    for name, value in values.items():
        p = declared.get(name)
        if p is None:
            errors.append(unknown_message(entry, name))
            continue
        try:
            checked[name] = p.check(value)
        except ConfigError as exc:
            errors.append(str(exc))
    return checked, errors


def hyperparameter_errors(stage: str, values: Mapping[str, Any]) -> list[str]:
    """ "hyperparameters.<name>: reason" for every bad hyperparameter of a ``stage`` stage.

    Unknown names come with a "did you mean"; then types, bounds and choices, field by field;
    then, when every field is fine, the rules that relate fields (``mini_batch_size`` divides
    ``rollout_batch_size``, ...).
    """
    entry = CATALOGUE[stage]
    checked, errors = _check_fields(entry, values)
    if errors:
        return errors
    try:
        entry.hyperparameters(**checked)
    except ConfigError as exc:
        return [str(exc)]
    return []


def input_errors(stage: str, present: Iterable[str]) -> list[str]:
    """The required-input rules for a stage config; ``present``: the StageConfig.inputs fields set."""
    entry = CATALOGUE[stage]
    have = set(present)
    return [
        f"inputs.{ROLES[group[0]].attr}: {needs_message(entry, group, why)}"
        for group, why in entry.requires
        if not any(ROLES[role].attr in have for role in group)
    ]


def unknown_message(entry: StageType, name: str) -> str:
    known = [p.name for p in entry.params]
    hint = _suggest(name, known) or f" (known: {', '.join(sorted(known))})"
    return f"hyperparameters.{name}: unknown hyperparameter of {entry.article} {entry.name} stage{hint}"


def parse_hyperparameters(stage: str, values: Mapping[str, Any]) -> Any:
    """The stage's frozen hyperparameter dataclass from a config's values, or the first error."""
    entry = CATALOGUE[stage]
    checked, errors = _check_fields(entry, values)
    if errors:
        raise ConfigError(errors[0])
    return entry.hyperparameters(**checked)  # raises ConfigError for the rules that relate fields


def defaults(stage: str) -> dict[str, Any]:
    """Every hyperparameter of ``stage`` at its default, as a manifest would spell it out."""
    # A copy: the cached Params share their dict and list defaults.
    return copy.deepcopy({p.name: p.default for p in CATALOGUE[stage].params})


def describe(stage: str | None = None) -> str:
    """``kubealign stages [TYPE]``: the catalogue, or one stage type with all its hyperparameters."""
    if stage is None:
        width = max(map(len, CATALOGUE))
        lines = ["Stage types (kubealign stages TYPE for inputs and hyperparameters):", ""]
        for name, entry in CATALOGUE.items():
            lines.append(f"  {name:<{width}}  {entry.summary}; produces a {entry.produces}")
        return "\n".join(lines) + "\n"
    entry = stage_type(stage)
    lines = [f"{entry.name}: {entry.summary}", f"  module:   python -m {entry.module}"]
    lines.append(f"  produces: a {entry.produces}")
    lines.append("  inputs:")
    for group, why in entry.requires:
        lines.append(f"    {' or '.join(group):<22} required: {why}")
    for role in entry.optional:
        lines.append(f"    {role:<22} optional: {ROLES[role].doc}")
    if entry.needs_reward:
        lines.append("  reward:   inputs.rewardModel or hyperparameters.scorer (at least one)")
    lines.append("  hyperparameters (spec.stages[].hyperparameters.<name>):")
    rows = [(p.name, p.describe_type(), _show(p.default), p.constraint(), p.doc) for p in entry.params]
    name_w = max(len(r[0]) for r in rows)
    type_w = max(len(r[1]) for r in rows)
    default_w = min(24, max(len(r[2]) for r in rows))
    header = ("NAME", "TYPE", "DEFAULT")
    lines.append(
        f"    {header[0]:<{name_w}}  {header[1]:<{type_w}}  {header[2]:<{default_w}}  DESCRIPTION [BOUNDS]"
    )
    for name, kind, default, constraint, doc in rows:
        extra = f" [{constraint}]" if constraint else ""
        lines.append(f"    {name:<{name_w}}  {kind:<{type_w}}  {default:<{default_w}}  {doc}{extra}")
    return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
