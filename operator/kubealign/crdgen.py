"""The API server's catalogue-derived rules, generated from ``kubealign_jobs.stages``.

Two places refuse a bad AlignmentRun at ``kubectl apply``, and both are written from the stage
catalogue here:

- the CRD, ``crds/alignmentruns.kubealign.io.yaml``: hand-written except for blocks between
  ``# BEGIN generated: <name>`` and ``# END generated: <name>`` comment lines:
  ``stage-type`` (the ``type`` field's description and enum) and ``stage-inputs`` (CEL rules on
  each stage: required inputs, and inputs its type does not read);
- a ValidatingAdmissionPolicy, ``operator/kubealign/policy/hyperparameters.yaml`` (the chart
  installs it; ``kubealign crd`` prints it after the CRD): unknown hyperparameter names with a
  "did you mean", wrong types, out-of-range values and bad choices, and the reward-source rule,
  each message naming ``spec.stages[<i>].hyperparameters.<name>``.

Why a policy and not CRD rules: ``hyperparameters`` is free-form (each stage type has its own
names), and CRD validation rules cannot see fields the schema does not declare, while an
admission policy's CEL reads the whole object. The policy checks what one field can say;
cross-field rules (``mini_batch_size`` divides ``rollout_batch_size``) are left to
``kubealign validate`` and the operator, which run the catalogue's own Python checks.

``tools/sync_chart.py`` regenerates both (and copies them into the chart); ``render_crd(text)``
and ``policy_text()`` are pure, and tests fail while the files differ from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

import yaml

from kubealign_jobs import stages
from kubealign_jobs.stages import CATALOGUE, ROLES, Kind, Param

BLOCK = re.compile(
    r"^(?P<indent>[ ]*)# BEGIN generated: (?P<name>[-a-z]+)\n.*?^(?P=indent)# END generated: (?P=name)\n",
    re.MULTILINE | re.DOTALL,
)
HEADER: Final = "from the stage catalogue by tools/sync_chart.py; do not edit"


def _quote(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _has_role(role: str) -> str:
    if role == "policies":
        return "(has(self.inputs.policies) && size(self.inputs.policies) > 0)"
    return f"has(self.inputs.{role})"


def _readers(role: str) -> list[str]:
    """The stage types that read input ``role``."""
    return [name for name, entry in CATALOGUE.items() if role in entry.roles]


# ---------------------------------------------------------------------------- per-stage rules


def input_rules() -> list[dict[str, Any]]:
    """Required inputs, and inputs a stage type does not read."""
    rules: list[dict[str, Any]] = []
    for entry in CATALOGUE.values():
        for group, why in entry.requires:
            present = " || ".join(_has_role(role) for role in group)
            rules.append(
                {
                    "rule": f"self.type != '{entry.name}' || (has(self.inputs) && ({present}))",
                    "message": stages.needs_message(entry, group, why),
                    "fieldPath": f".inputs.{group[0]}" if len(group) == 1 else ".inputs",
                    "reason": "FieldValueRequired",
                }
            )
    for role in ROLES:
        readers = _readers(role)
        if len(readers) == len(CATALOGUE):
            continue
        rules.append(
            {
                "rule": f"self.type in {_quote(readers)} || !has(self.inputs) || !has(self.inputs.{role})",
                "message": role_forbidden_message(role),
                "fieldPath": f".inputs.{role}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


def role_forbidden_message(role: str) -> str:
    readers = _readers(role)
    names = readers[0] if len(readers) == 1 else ", ".join(readers[:-1]) + " and " + readers[-1]
    return f"inputs.{role} is only for {names} stages"


# ---------------------------------------------------------------------------- hyperparameter rules


def _literal(value: float, kind: Kind) -> str:
    return repr(int(value)) if kind is Kind.INT else repr(float(value))


def value_check(p: Param, v: str) -> str:
    """A CEL expression true when the value ``v`` is acceptable for ``p`` (one field's rules)."""
    number = f"(type({v}) == int || type({v}) == double)"
    checks = {
        Kind.BOOL: [f"type({v}) == bool"],
        Kind.INT: [f"type({v}) == int"],
        Kind.FLOAT: [number],
        Kind.STR: [f"type({v}) == string"],
        Kind.OBJECT: [f"type({v}) == map"],
        Kind.NUMBERS: [f"type({v}) == list"],
    }[p.kind]
    if p.kind is Kind.NUMBERS:
        item = Param(p.name, Kind.FLOAT, None, p.doc, ge=p.ge, gt=p.gt, le=p.le, lt=p.lt)
        checks.append(f"{v}.all(t, {value_check(item, 't')})")
    if p.kind in (Kind.INT, Kind.FLOAT):
        x = v if p.kind is Kind.INT else f"double({v})"
        for op, bound in ((">=", p.ge), (">", p.gt), ("<=", p.le), ("<", p.lt)):
            if bound is not None:
                checks.append(f"{x} {op} {_literal(bound, p.kind)}")
    if p.choices:
        checks.append(f"{v} in {_quote(p.choices)}")
    expression = " && ".join(checks)
    return f"({v} == null || ({expression}))" if p.nullable else f"({expression})"


def expected(p: Param) -> str:
    """What a value must be, in the words of the API server's message."""
    constraint = p.constraint()
    article = "an" if p.kind.value[0] in "aeiou" else "a"
    return f"{article} {p.kind.value}" + (f" {constraint}" if constraint else "")


def _stage_filter(types: Sequence[str], condition: str) -> str:
    match = f"s.type == '{types[0]}'" if len(types) == 1 else f"s.type in {_quote(types)}"
    return f"{match} && has(s.hyperparameters) && {condition}"


STAGES: Final = "object.spec.stages"


def reward_rules() -> list[dict[str, Any]]:
    """The one reward-source rule: inputs.rewardModel or hyperparameters.scorer (at least one)."""
    rules = []
    for entry in CATALOGUE.values():
        if not entry.needs_reward:
            continue
        where = (
            f"s.type == '{entry.name}' && !(has(s.inputs) && has(s.inputs.rewardModel)) && "
            "!(has(s.hyperparameters) && 'scorer' in s.hyperparameters && "
            "s.hyperparameters['scorer'] != null)"
        )
        rules.append(
            {
                "expression": f"!{STAGES}.exists(s, {where})",
                "messageExpression": (
                    f"{STAGES}.transformList(i, s, {where}, 'spec.stages[' + string(i) + "
                    f"'].inputs.rewardModel: {stages.reward_message(entry)}')[0]"
                ),
                "message": stages.reward_message(entry),
                "reason": "Invalid",
            }
        )
    return rules


def hyperparameter_rules() -> list[dict[str, Any]]:
    """Unknown names per stage type, then one rule per field check (shared by the types that agree)."""
    rules: list[dict[str, Any]] = []
    for entry in CATALOGUE.values():
        known = f"variables.known_{entry.name}"
        bad = f"s.hyperparameters.exists(k, !(k in {known}))"
        where = _stage_filter([entry.name], bad)
        # CEL has no edit distance: a prefix either way catches plurals and cut-off names, and
        # `kubealign validate` (difflib) suggests the rest.
        # Of those, the one closest in length: ppo_epoch -> ppo_epochs, clip_range_valuex -> clip_range_value.
        near = "n.startsWith(k) || k.startsWith(n)"
        distance = "(size(n) - size(k)) * (size(n) - size(k))"
        closest = f"{known}.filter(n, {near}).map(n, {distance}).min()"
        hint = (
            f"({known}.exists(n, {near}) ? '; did you mean ' + "
            f"{known}.filter(n, ({near}) && {distance} == {closest})[0] + '?' : "
            f"' (kubealign stages {entry.name} lists them)')"
        )
        message = (
            f"{STAGES}.transformList(i, s, {where}, s.hyperparameters.filter(k, !(k in {known})).map(k, "
            f"'spec.stages[' + string(i) + '].hyperparameters.' + k + "
            f"': unknown hyperparameter of {entry.article} {entry.name} stage' + {hint})[0])[0]"
        )
        rules.append(
            {
                "expression": f"!{STAGES}.exists(s, {where})",
                "messageExpression": message,
                "message": unknown_rule_message(entry.name),
                "reason": "Invalid",
            }
        )
    groups: dict[tuple[str, str], list[str]] = {}
    params: dict[tuple[str, str], Param] = {}
    for entry in CATALOGUE.values():
        for p in entry.params:
            key = (p.name, value_check(p, "VALUE"))
            groups.setdefault(key, []).append(entry.name)
            params[key] = p
    for key, types in groups.items():
        p = params[key]
        v = f"s.hyperparameters['{p.name}']"
        where = _stage_filter(types, f"'{p.name}' in s.hyperparameters && !{value_check(p, v)}")
        text = f"must be {expected(p)}"
        rules.append(
            {
                "expression": f"!{STAGES}.exists(s, {where})",
                "messageExpression": (
                    f"{STAGES}.transformList(i, s, {where}, 'spec.stages[' + string(i) + "
                    f"'].hyperparameters.{p.name}: {text}')[0]"
                ),
                "message": f"hyperparameters.{p.name}: {text}",
                "reason": "Invalid",
            }
        )
    return rules


SEED_PARAM: Final = Param("seed", Kind.INT, None, "a sweep's seed", ge=0)


def sweep_rules() -> list[dict[str, Any]]:
    """The same checks for the values listed in ``sweep``: names, then each value's type and bounds."""
    rules: list[dict[str, Any]] = []
    for entry in CATALOGUE.values():
        known = f"variables.known_{entry.name}"
        bad = f"s.sweep.exists(k, k != 'seed' && !(k in {known}))"
        where = f"s.type == '{entry.name}' && has(s.sweep) && {bad}"
        rules.append(
            {
                "expression": f"!{STAGES}.exists(s, {where})",
                "messageExpression": (
                    f"{STAGES}.transformList(i, s, {where}, s.sweep.filter(k, k != 'seed' && !(k in {known}))"
                    f".map(k, 'spec.stages[' + string(i) + '].sweep.' + k + "
                    f"': {sweep_unknown_message(entry.name)}')[0])[0]"
                ),
                "message": sweep_unknown_message(entry.name),
                "reason": "Invalid",
            }
        )
    seed = (SEED_PARAM.name, value_check(SEED_PARAM, "VALUE"))
    groups: dict[tuple[str, str], list[str]] = {seed: list(CATALOGUE)}
    params: dict[tuple[str, str], Param] = {seed: SEED_PARAM}
    for entry in CATALOGUE.values():
        for p in entry.params:
            key = (p.name, value_check(p, "VALUE"))
            groups.setdefault(key, []).append(entry.name)
            params[key] = p
    for key, types in groups.items():
        p = params[key]
        condition = (
            f"has(s.sweep) && '{p.name}' in s.sweep && !s.sweep['{p.name}'].all(v, {value_check(p, 'v')})"
        )
        where = _stage_filter(types, condition).replace(" && has(s.hyperparameters)", "")
        text = f"every value must be {expected(p)}"
        rules.append(
            {
                "expression": f"!{STAGES}.exists(s, {where})",
                "messageExpression": (
                    f"{STAGES}.transformList(i, s, {where}, 'spec.stages[' + string(i) + "
                    f"'].sweep.{p.name}: {text}')[0]"
                ),
                "message": f"sweep.{p.name}: {text}",
                "reason": "Invalid",
            }
        )
    return rules


def sweep_unknown_message(stage: str) -> str:
    return f"not a hyperparameter of a {stage} stage, nor seed (kubealign stages {stage} lists them)"


def unknown_rule_message(stage: str) -> str:
    return f"unknown hyperparameter of a {stage} stage (kubealign stages {stage} lists them)"


def crd_messages() -> set[str]:
    """The ``message`` of every rule generated into the CRD."""
    return {rule["message"] for rule in input_rules()}


# ---------------------------------------------------------------------------- the admission policy

POLICY_NAME: Final = "alignmentruns.kubealign.io-hyperparameters"
POLICY_FILE: Final = "hyperparameters.yaml"


def known_names() -> list[dict[str, str]]:
    """The policy's variables: each stage type's hyperparameter names, ``variables.known_<type>``."""
    return [
        {"name": f"known_{name}", "expression": _quote(p.name for p in entry.params)}
        for name, entry in CATALOGUE.items()
    ]


def policy() -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding (every namespace, deny)."""
    validations = reward_rules() + hyperparameter_rules() + sweep_rules()
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": POLICY_NAME},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["kubealign.io"],
                            "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["alignmentruns"],
                        }
                    ]
                },
                "variables": known_names(),
                "validations": validations,
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY_NAME},
            "spec": {"policyName": POLICY_NAME, "validationActions": ["Deny"]},
        },
    ]


def policy_messages() -> set[str]:
    return {rule["message"] for rule in reward_rules() + hyperparameter_rules() + sweep_rules()}


def policy_text() -> str:
    """The policy file: generated from the catalogue, two YAML documents."""
    header = (
        "# The AlignmentRun hyperparameter rules, generated from the stage catalogue\n"
        "# (jobs/kubealign_jobs/stages.py) by tools/sync_chart.py; do not edit.\n"
    )
    body = "---\n".join(
        yaml.safe_dump(doc, sort_keys=False, width=100, default_flow_style=False) for doc in policy()
    )
    return header + body


# ---------------------------------------------------------------------------- the stage type field


def stage_type_field() -> dict[str, Any]:
    lines = [
        "What the stage trains or computes (kubealign stages TYPE prints its inputs and hyperparameters)."
    ]
    for entry in CATALOGUE.values():
        needs = "; ".join(" or ".join(group) for group, _ in entry.requires)
        lines.append(f"{entry.name}: {entry.summary} (needs {needs}; produces a {entry.produces}).")
    return {"description": " ".join(lines), "type": "string", "enum": list(CATALOGUE)}


# ---------------------------------------------------------------------------- splicing


def _dump(value: Any, indent: str) -> str:
    text = yaml.safe_dump(value, sort_keys=False, width=100, default_flow_style=False, allow_unicode=True)
    return "".join(f"{indent}{line}\n" if line else "\n" for line in text.splitlines())


def blocks() -> dict[str, Any]:
    return {"stage-type": stage_type_field(), "stage-inputs": input_rules()}


def render_crd(text: str) -> str:
    """``text`` with every generated block rewritten from the catalogue; the rest is untouched."""
    generated = blocks()
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name, indent = match["name"], match["indent"]
        if name not in generated:
            raise ValueError(f"CRD: unknown generated block {name!r} (known: {', '.join(generated)})")
        seen.add(name)
        return (
            f"{indent}# BEGIN generated: {name}\n{indent}# {HEADER}\n"
            f"{_dump(generated[name], indent)}{indent}# END generated: {name}\n"
        )

    out = BLOCK.sub(replace, text)
    missing = sorted(set(generated) - seen)
    if missing:
        raise ValueError(f"CRD: no generated block for {', '.join(missing)}")
    return out
