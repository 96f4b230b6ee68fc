"""The AlignmentRun API in Python: typed spec/status models and ``validate``, the CRD's twin.

The CRD in ``crds/alignmentruns.kubealign.io.yaml`` is the single source of truth. This module loads
it (through the package-data symlink ``kubealign/crd/``), validates manifests against its structural
schema with jsonschema, and re-implements each of its CEL rules (``x-kubernetes-validations``) in
Python, so the local runner rejects exactly what the API server rejects. On top of that it checks
what the schema does not say (which stage types an input may come from, and, for the operator, that
every stage has a trainer image once install-wide defaults are applied); the operator reports those
as a ``Valid=False`` condition instead of crashing.

Everything here is pure: dicts in, frozen dataclasses and lists of ``FieldError`` out.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import jsonschema
import yaml

from kubealign import crdgen
from kubealign.defaults import ENV_IMAGE
from kubealign_jobs import stages
from kubealign_jobs.stages import CATALOGUE, ROLES

GROUP: Final = "kubealign.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "AlignmentRun"
PLURAL: Final = "alignmentruns"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
CRD_FILE: Final = f"{CRD_NAME}.yaml"

STAGE_TYPES: Final = stages.STAGE_TYPES

# Input roles with one source: the camelCase key of the API next to the snake_case field of StageInputs.
SINGLE_ROLES: Final = tuple((role.key, role.attr) for role in ROLES.values() if role.key != "policies")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class FieldError:
    """One reason a manifest is invalid; ``path`` names the field like the API server does."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --- the CRD -----------------------------------------------------------------------------------


@functools.cache
def load_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict, read from the package data (a symlink into crds/)."""
    text = resources.files("kubealign").joinpath("crd", CRD_FILE).read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{CRD_FILE}: expected a CustomResourceDefinition document")
    return doc


def crd_text() -> str:
    """The CRD file's text, for ``kubealign crd | kubectl apply -f -``."""
    return resources.files("kubealign").joinpath("crd", CRD_FILE).read_text(encoding="utf-8")


def openapi_schema() -> dict[str, Any]:
    """The served version's openAPIV3Schema."""
    for version in load_crd()["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise ValueError(f"{CRD_FILE}: no version {VERSION}")


def cel_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every x-kubernetes-validations rule in the schema, with the schema path it sits on."""

    def walk(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for rule in node.get("x-kubernetes-validations", ()):
            yield path, rule
        for name, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{name}" if path else name)
        if "items" in node:
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), Mapping):
            yield from walk(node["additionalProperties"], f"{path}{{}}")

    yield from walk(openapi_schema(), "")


def _to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a Kubernetes structural schema node into plain JSON Schema.

    Kubernetes rejects unknown fields (kubectl's strict field validation) unless a node says
    x-kubernetes-preserve-unknown-fields, so objects with declared properties are closed here.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default"):
            continue
        if key == "properties":
            out[key] = {name: _to_json_schema(child) for name, child in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, Mapping)):
            out[key] = _to_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        string_schema: dict[str, Any] = {"type": "string"}
        if "pattern" in out:
            string_schema["pattern"] = out.pop("pattern")
        out["anyOf"] = [{"type": "integer"}, string_schema]
    if (
        out.get("type") == "object"
        and "properties" in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_to_json_schema(openapi_schema()))


# --- validation ---------------------------------------------------------------------------------


def _path(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _structural_errors(manifest: Mapping[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        base = _path(list(error.absolute_path))
        instance = error.instance
        if error.validator == "required" and isinstance(instance, Mapping):
            errors.extend(
                FieldError(_join(base, name), "Required value")
                for name in error.validator_value
                if name not in instance
            )
        elif error.validator == "additionalProperties" and isinstance(instance, Mapping):
            known = set(error.schema.get("properties", {}))
            errors.extend(
                FieldError(_join(base, name), "unknown field") for name in sorted(set(instance) - known)
            )
        elif error.validator == "enum":
            allowed = ", ".join(map(str, error.validator_value))
            errors.append(FieldError(base, f"Unsupported value {instance!r}: supported values: {allowed}"))
        elif error.validator == "pattern":
            errors.append(FieldError(base, f"Invalid value {instance!r}: must match {error.validator_value}"))
        elif error.validator == "anyOf":
            errors.append(FieldError(base, f"Invalid value {instance!r}: must be an integer or a quantity"))
        else:
            errors.append(FieldError(base, error.message))
    return list(dict.fromkeys(errors))


def _sources(stage: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(relative path, InputSource) for every input of a stage manifest."""
    inputs = stage.get("inputs") or {}
    for role, _ in SINGLE_ROLES:
        if role in inputs:
            yield f"inputs.{role}", inputs[role]
    for index, policy in enumerate(inputs.get("policies") or ()):
        yield f"inputs.policies[{index}]", policy


# Messages of the CEL rules, word for word as in the CRD: tests check both sides name the same rules.
MSG_RUN_NAME: Final = (
    "metadata.name must be a DNS label (at most 63 lowercase letters, digits and '-', starting with a "
    "letter): it names the run's Jobs, Services and labels"
)
MSG_SELF_INPUT: Final = "a stage cannot take input from itself"
MSG_EXACTLY_ONE: Final = "set exactly one of from or uri"
MSG_POLICY_NAME: Final = "a policy given by uri needs a name"


def msg_from_earlier(role: str) -> str:
    """The CRD's message for a ``from`` that does not name an earlier stage."""
    suffix = "policies[].from" if role == "policies" else f"{role}.from"
    return (
        f"inputs.{suffix} must name a stage listed earlier in spec.stages "
        "(stages are listed in dependency order)"
    )


def _cel_errors(manifest: Mapping[str, Any]) -> list[FieldError]:
    """Python twins of the CRD's CEL rules; run only on manifests that passed the structural schema."""
    errors: list[FieldError] = []
    name = str(manifest.get("metadata", {}).get("name", ""))
    if not (len(name) <= 63 and _DNS_LABEL.fullmatch(name)):
        errors.append(FieldError("metadata.name", MSG_RUN_NAME))
    listed: Sequence[Mapping[str, Any]] = manifest["spec"]["stages"]
    names = [stage["name"] for stage in listed]
    for index, stage in enumerate(listed):
        at = f"spec.stages[{index}]"
        errors.extend(_catalogue_errors(at, stage))
        for where, source in _sources(stage):
            if ("from" in source) == ("uri" in source):
                errors.append(FieldError(f"{at}.{where}", MSG_EXACTLY_ONE))
            if where.startswith("inputs.policies") and "from" not in source and "name" not in source:
                errors.append(FieldError(f"{at}.{where}.name", MSG_POLICY_NAME))
            upstream = source.get("from")
            if upstream is None:
                continue
            role = where.split(".")[1].split("[")[0]
            if upstream == stage["name"]:
                # The CRD puts the policies rule on the list, the others on the from field itself.
                path = f"{at}.inputs.policies" if role == "policies" else f"{at}.{where}.from"
                errors.append(FieldError(path, MSG_SELF_INPUT))
            elif upstream not in names or names.index(upstream) >= index:
                errors.append(FieldError(f"{at}.{where}.from", msg_from_earlier(role)))
    return list(dict.fromkeys(errors))


def _catalogue_errors(at: str, stage: Mapping[str, Any]) -> Iterator[FieldError]:
    """The rules ``kubealign.crdgen`` generates into the CRD, checked from the same catalogue entry."""
    entry = CATALOGUE[stage["type"]]
    inputs = stage.get("inputs") or {}
    hyperparameters = stage.get("hyperparameters") or {}
    for group, why in entry.requires:
        if not any(inputs.get(role) for role in group):
            where = f"inputs.{group[0]}" if len(group) == 1 else "inputs"
            yield FieldError(f"{at}.{where}", stages.needs_message(entry, group, why))
    for role in inputs:
        if role not in entry.roles:
            yield FieldError(f"{at}.inputs.{role}", crdgen.role_forbidden_message(role))
    if entry.needs_reward and "rewardModel" not in inputs and hyperparameters.get("scorer") is None:
        yield FieldError(f"{at}.inputs.rewardModel", stages.reward_message(entry))
    for _, message in stages.hyperparameter_errors(entry.name, hyperparameters):
        where, reason = message.split(": ", 1)
        yield FieldError(f"{at}.{where}", reason)


def _semantic_errors(manifest: Mapping[str, Any]) -> list[FieldError]:
    """What the schema does not say: an input must come from a stage that produces that kind of thing."""
    errors: list[FieldError] = []
    listed: Sequence[Mapping[str, Any]] = manifest["spec"]["stages"]
    types = {stage["name"]: stage["type"] for stage in listed}
    for index, stage in enumerate(listed):
        seen: dict[str, str] = {}
        for where, source in _sources(stage):
            role = where.split(".")[1].split("[")[0]
            upstream = source.get("from")
            accepts = ROLES[role].accepts
            if (
                upstream in types
                and accepts is not None
                and CATALOGUE[types[upstream]].produces is not accepts
            ):
                makers = ", ".join(stages.producers(accepts))
                errors.append(
                    FieldError(
                        f"spec.stages[{index}].{where}.from",
                        f"stage {upstream!r} is a {types[upstream]} stage; {role} needs a {accepts} "
                        f"({makers})",
                    )
                )
            if role == "policies":
                policy = str(source.get("name") or upstream or "")
                if policy in seen:
                    errors.append(
                        FieldError(
                            f"spec.stages[{index}].{where}",
                            f"duplicate policy name {policy!r} (also {seen[policy]})",
                        )
                    )
                seen.setdefault(policy, where)
    return errors


def _image_errors(manifest: Mapping[str, Any]) -> list[FieldError]:
    """Pods need an image: from the stage, spec.image, or the install-wide default filled in before."""
    spec = manifest["spec"]
    if "image" in spec:
        return []
    without = [stage["name"] for stage in spec["stages"] if "image" not in stage]
    if not without:
        return []
    return [
        FieldError(
            "spec.image",
            f"no trainer image for stage(s) {', '.join(without)}: set spec.image, an image on every "
            f"stage, or the operator's install-wide default (Helm value defaultTrainerImage / env "
            f"{ENV_IMAGE})",
        )
    ]


def _duplicate_stage_errors(manifest: Mapping[str, Any]) -> list[FieldError]:
    """The list-map key of spec.stages (x-kubernetes-list-map-keys: [name]) must be unique."""
    errors: list[FieldError] = []
    seen: set[str] = set()
    for index, stage in enumerate(manifest["spec"]["stages"]):
        if stage["name"] in seen:
            errors.append(FieldError(f"spec.stages[{index}]", f"Duplicate value: name {stage['name']!r}"))
        seen.add(stage["name"])
    return errors


def validate(manifest: Mapping[str, Any], *, require_image: bool = False) -> list[FieldError]:
    """Every reason ``manifest`` is not a valid AlignmentRun; empty when it is.

    Structural schema first (types, enums, patterns, required and unknown fields); when that passes,
    the CEL rules and list-map keys; when those pass, the checks only the operator makes.
    ``require_image`` (the operator, after applying its install-wide defaults) also demands a trainer
    image for every stage; the local runner and offline validation need none.
    """
    if not isinstance(manifest, Mapping):
        return [FieldError("(root)", "expected an AlignmentRun object")]
    errors: list[FieldError] = []
    if manifest.get("apiVersion") != API_VERSION:
        errors.append(
            FieldError("apiVersion", f"expected {API_VERSION!r}, got {manifest.get('apiVersion')!r}")
        )
    if manifest.get("kind") != KIND:
        errors.append(FieldError("kind", f"expected {KIND!r}, got {manifest.get('kind')!r}"))
    if not isinstance(manifest.get("metadata"), Mapping) or not manifest["metadata"].get("name"):
        errors.append(FieldError("metadata.name", "Required value"))
    errors.extend(_structural_errors(manifest))
    if errors:
        return errors
    checks = [_duplicate_stage_errors, _cel_errors, _semantic_errors]
    if require_image:
        checks.append(_image_errors)
    for check in checks:
        errors.extend(check(manifest))
        if errors:
            return errors
    return errors


# --- manifests from files -------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestDocument:
    """One YAML document of a manifest file, with the line of every field for error messages."""

    body: Any
    start_line: int
    lines: Mapping[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int:
        """The line of ``path``, or of its nearest enclosing field present in the file."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.start_line


def _node_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = _join(path, str(key.value))
            lines[child] = key.start_mark.line + 1
            _node_lines(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            lines[child] = item.start_mark.line + 1
            _node_lines(item, child, lines)


def load_manifests(text: str) -> list[ManifestDocument]:
    """Parse a (multi-document) YAML file; raises yaml.YAMLError, whose message has the line."""
    bodies = list(yaml.safe_load_all(text))
    nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    documents: list[ManifestDocument] = []
    for body, node in zip(bodies, nodes, strict=True):
        if node is None:
            continue
        lines: dict[str, int] = {}
        _node_lines(node, "", lines)
        documents.append(ManifestDocument(body=body, start_line=node.start_mark.line + 1, lines=lines))
    return documents


# --- the typed spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSource:
    """One input: the artifact of an earlier stage (``from_stage``) or an existing ``uri``."""

    from_stage: str | None = None
    uri: str | None = None
    name: str | None = None

    @property
    def policy_name(self) -> str:
        """The name an evaluate stage reports this policy under."""
        return self.name or self.from_stage or ""

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> InputSource:
        return cls(from_stage=doc.get("from"), uri=doc.get("uri"), name=doc.get("name"))


@dataclass(frozen=True)
class StageInputs:
    """A stage's inputs by role; see the CRD for what each stage type needs."""

    model: InputSource | None = None
    data: InputSource | None = None
    eval_data: InputSource | None = None
    reward_model: InputSource | None = None
    reference: InputSource | None = None
    policies: tuple[InputSource, ...] = ()

    def upstream(self) -> tuple[str, ...]:
        """The stages this one waits for, in role order, without repeats."""
        sources = [getattr(self, attr) for _, attr in SINGLE_ROLES] + list(self.policies)
        return tuple(dict.fromkeys(s.from_stage for s in sources if s is not None and s.from_stage))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StageInputs:
        single = {attr: InputSource.from_dict(doc[role]) for role, attr in SINGLE_ROLES if role in doc}
        policies = tuple(InputSource.from_dict(p) for p in doc.get("policies") or ())
        return cls(**single, policies=policies)


@dataclass(frozen=True)
class Resources:
    """Per-pod resources of one stage; defaults match the CRD's."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpu: str | None = None
    memory: str | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Resources:
        return cls(
            nodes=int(doc.get("nodes", 1)),
            gpus_per_node=int(doc.get("gpusPerNode", 0)),
            cpu=None if doc.get("cpu") is None else str(doc["cpu"]),
            memory=None if doc.get("memory") is None else str(doc["memory"]),
        )


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    type: str
    inputs: StageInputs = field(default_factory=StageInputs)
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    image: str | None = None
    resources: Resources = field(default_factory=Resources)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    max_retries: int = 2
    pod_annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Stage:
        return cls(
            name=doc["name"],
            type=doc["type"],
            inputs=StageInputs.from_dict(doc.get("inputs") or {}),
            hyperparameters=dict(doc.get("hyperparameters") or {}),
            image=doc.get("image"),
            resources=Resources.from_dict(doc.get("resources") or {}),
            node_selector=dict(doc.get("nodeSelector") or {}),
            tolerations=tuple(dict(t) for t in doc.get("tolerations") or ()),
            max_retries=int(doc.get("maxRetries", 2)),
            pod_annotations=dict(doc.get("podAnnotations") or {}),
        )


@dataclass(frozen=True)
class Storage:
    """Where artifacts live and how pods reach the store; credentials only by Secret reference."""

    uri: str
    endpoint: str | None = None
    region: str | None = None
    secret_name: str | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Storage:
        return cls(
            uri=doc["uri"],
            endpoint=doc.get("endpoint"),
            region=doc.get("region"),
            secret_name=(doc.get("secretRef") or {}).get("name"),
        )


@dataclass(frozen=True)
class RunSpec:
    """The desired pipeline."""

    stages: tuple[Stage, ...]
    storage: Storage
    image: str | None = None
    service_account_name: str | None = None
    queue_name: str | None = None
    priority_class_name: str | None = None
    suspend: bool = False
    pod_annotations: Mapping[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RunSpec:
        return cls(
            stages=tuple(Stage.from_dict(s) for s in doc["stages"]),
            storage=Storage.from_dict(doc["storage"]),
            image=doc.get("image"),
            service_account_name=doc.get("serviceAccountName"),
            queue_name=doc.get("queueName"),
            priority_class_name=doc.get("priorityClassName"),
            suspend=bool(doc.get("suspend", False)),
            pod_annotations=dict(doc.get("podAnnotations") or {}),
        )


@dataclass(frozen=True)
class AlignmentRun:
    """A run as the operator needs it: identity for owner references, generation, and spec."""

    name: str
    namespace: str
    spec: RunSpec
    uid: str = ""
    generation: int = 0

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> AlignmentRun:
        """Parse a manifest that ``validate`` accepted; CRD defaults apply to absent fields."""
        meta = manifest["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            spec=RunSpec.from_dict(manifest["spec"]),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation", 0)),
        )


# --- the typed status ---------------------------------------------------------------------------


def _drop_none(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if value is not None}


@dataclass(frozen=True)
class Condition:
    """A Kubernetes-style condition; lastTransitionTime changes only when status does."""

    type: str
    status: str
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "type": self.type,
                "status": self.status,
                "reason": self.reason,
                "message": self.message,
                "lastTransitionTime": self.last_transition_time,
                "observedGeneration": self.observed_generation,
            }
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Condition:
        return cls(
            type=str(doc.get("type", "")),
            status=str(doc.get("status", "Unknown")),
            reason=str(doc.get("reason", "")),
            message=str(doc.get("message", "")),
            last_transition_time=doc.get("lastTransitionTime"),
            observed_generation=doc.get("observedGeneration"),
        )


@dataclass(frozen=True)
class StageStatus:
    """The observed state of one stage."""

    name: str
    type: str
    phase: str = "Pending"
    job_name: str | None = None
    attempts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    output: str | None = None
    metrics: Mapping[str, Any] | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "name": self.name,
                "type": self.type,
                "phase": self.phase,
                "jobName": self.job_name,
                "attempts": self.attempts,
                "startTime": self.start_time,
                "completionTime": self.completion_time,
                "output": self.output,
                "metrics": None if self.metrics is None else dict(self.metrics),
                "message": self.message or None,
            }
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StageStatus:
        metrics = doc.get("metrics")
        return cls(
            name=str(doc.get("name", "")),
            type=str(doc.get("type", "")),
            phase=str(doc.get("phase", "Pending")),
            job_name=doc.get("jobName"),
            attempts=int(doc.get("attempts", 0)),
            start_time=doc.get("startTime"),
            completion_time=doc.get("completionTime"),
            output=doc.get("output"),
            metrics=dict(metrics) if isinstance(metrics, Mapping) else None,
            message=str(doc.get("message", "")),
        )


@dataclass(frozen=True)
class RunStatus:
    """The run's status subresource."""

    phase: str = "Pending"
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()
    start_time: str | None = None
    completion_time: str | None = None
    progress: str | None = None
    running_stages: str = ""
    stages: tuple[StageStatus, ...] = ()

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def stage(self, name: str) -> StageStatus | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "phase": self.phase,
                "observedGeneration": self.observed_generation,
                "conditions": [c.to_dict() for c in self.conditions],
                "startTime": self.start_time,
                "completionTime": self.completion_time,
                "progress": self.progress,
                "runningStages": self.running_stages,
                "stages": [s.to_dict() for s in self.stages],
            }
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> RunStatus:
        """Read a status the operator wrote earlier; anything unreadable starts from scratch."""
        if not isinstance(doc, Mapping):
            return cls()
        return cls(
            phase=str(doc.get("phase", "Pending")),
            observed_generation=doc.get("observedGeneration"),
            conditions=tuple(
                Condition.from_dict(c) for c in doc.get("conditions") or () if isinstance(c, Mapping)
            ),
            start_time=doc.get("startTime"),
            completion_time=doc.get("completionTime"),
            progress=doc.get("progress"),
            running_stages=str(doc.get("runningStages", "")),
            stages=tuple(StageStatus.from_dict(s) for s in doc.get("stages") or () if isinstance(s, Mapping)),
        )
