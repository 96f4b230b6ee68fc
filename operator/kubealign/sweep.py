"""Sweeps: one declared stage, one Job per combination of hyperparameter values, purely.

A stage may carry ``sweep``, a map from hyperparameter name (or ``seed``) to a list of values::

    - name: dpo
      type: dpo
      sweep: {beta: [0.05, 0.1, 0.3], seed: [0, 1]}
      maxParallel: 2

``expand`` turns the declared stages into concrete ones before anything else looks at the spec,
so planning, rendering, status and the local runner see ordinary stages with deterministic
names (``dpo-beta-0p05-seed-0`` ... ``dpo-beta-0p3-seed-1``; a decimal point is spelled ``p``,
since stage names are DNS labels). Each member keeps its sweep values in ``Stage.sweep``.

A stage that reads a swept stage fans out with it: one member per member upstream, named and
seeded after it (``reward-seed-2`` reads ``generate-seed-2``). Several swept inputs join on the
keys they share, so ``ppo-seed-2`` reads ``sft-seed-2`` and ``reward-seed-2``, never a mix.
``inputs.policies`` does not fan out: an evaluate stage receives every member of a swept policy
stage (those that agree with its own values), each as a policy named after the member.

``errors`` lists what is wrong with the sweeps of a manifest, as (path, message) pairs naming
``spec.stages[<i>].sweep.<key>[<j>]``; ``expand`` assumes a manifest that passed it.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubealign import crdgen
from kubealign_jobs import stages
from kubealign_jobs.stages import CATALOGUE, ROLES

SEED: Final = "seed"
# Stage names become label values and path segments: DNS labels of at most 63 characters.
MAX_NAME: Final = 63
MAX_MEMBERS: Final = 64  # per declared stage
MAX_STAGES: Final = 256  # in the whole expanded run: its status must stay well inside an object
_HASH_LENGTH: Final = 8
SINGLE_ROLES: Final = tuple(role.key for role in ROLES.values() if role.key != "policies")


@dataclass(frozen=True)
class Member:
    """What makes a concrete stage one member of a sweep: its declared stage and its values."""

    of: str
    # Own values first, then those inherited from swept inputs, in declaration order.
    values: Mapping[str, Any]
    max_parallel: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.of, "values": dict(self.values)}


def slug(value: Any) -> str:
    """A value as it appears in a member's name: ``0.1`` -> ``0p1``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value).replace("+", "").replace(".", "p")
        return text.replace("-", "m", 1) if text.startswith("-") else text
    text = re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")
    return text or "x"


def _key_slug(key: str) -> str:
    return key.replace("_", "-")


def member_name(stage: str, values: Mapping[str, Any]) -> str:
    """``<stage>-<key>-<value>-...``, hashed down to a DNS label when long."""
    name = "-".join([stage, *(f"{_key_slug(k)}-{slug(v)}" for k, v in values.items())])
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    return name[: MAX_NAME - _HASH_LENGTH - 1].rstrip("-") + "-" + digest


def _combinations(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(sweep)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*sweep.values())]


def _agrees(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _join(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Natural join of two lists of value maps: pairs that agree on shared keys, merged."""
    return [{**a, **b} for a in left for b in right if _agrees(a, b)]


@dataclass(frozen=True)
class _Declared:
    """A declared stage's members: (name, values) each; one unnamed-values member if not swept."""

    members: tuple[tuple[str, dict[str, Any]], ...]

    @property
    def swept(self) -> bool:
        return any(values for _, values in self.members)


def _inherited(stage: Mapping[str, Any], declared: Mapping[str, _Declared]) -> list[dict[str, Any]]:
    """The value maps a stage inherits from the swept stages it reads through single-source roles."""
    combos: list[dict[str, Any]] = [{}]
    inputs = stage.get("inputs") or {}
    for role in SINGLE_ROLES:
        upstream = str((inputs.get(role) or {}).get("from", ""))
        if upstream in declared and declared[upstream].swept:
            combos = _join(combos, [values for _, values in declared[upstream].members])
    return combos


def _pick(upstream: _Declared, values: Mapping[str, Any]) -> list[str]:
    """The members of an upstream stage that agree with a member's values."""
    return [name for name, theirs in upstream.members if _agrees(theirs, values)]


def expand(listed: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], Member | None]]:
    """The concrete stage manifests of ``spec.stages``, each with its sweep membership (None: none).

    A member's manifest has its own name, its swept hyperparameters (and seed) filled in, no
    ``sweep`` or ``maxParallel``, and inputs that name the matching upstream members.
    """
    declared: dict[str, _Declared] = {}
    out: list[tuple[dict[str, Any], Member | None]] = []
    for stage in listed:
        own = _combinations(stage.get("sweep") or {})
        inherited = _inherited(stage, declared)
        combos = [{**mine, **theirs} for theirs in inherited for mine in own]
        if combos == [{}]:
            declared[stage["name"]] = _Declared(((stage["name"], {}),))
            out.append((_rewire(stage, stage["name"], {}, declared), None))
            continue
        members: list[tuple[str, dict[str, Any]]] = []
        for values in combos:
            name = member_name(stage["name"], values)
            members.append((name, values))
            doc = _rewire(stage, name, values, declared)
            hyperparameters = dict(doc.get("hyperparameters") or {})
            hyperparameters.update({k: v for k, v in values.items() if k in (stage.get("sweep") or {})})
            hyperparameters.pop(SEED, None)
            if hyperparameters:
                doc["hyperparameters"] = hyperparameters
            if SEED in values and "seed" not in stage:
                doc["seed"] = values[SEED]
            out.append((doc, Member(stage["name"], values, stage.get("maxParallel"))))
        declared[stage["name"]] = _Declared(tuple(members))
    return out


def _rewire(
    stage: Mapping[str, Any], name: str, values: Mapping[str, Any], declared: Mapping[str, _Declared]
) -> dict[str, Any]:
    doc = {k: v for k, v in stage.items() if k not in ("sweep", "maxParallel")}
    doc["name"] = name
    inputs = dict(stage.get("inputs") or {})
    for role in SINGLE_ROLES:
        source = inputs.get(role)
        if source and source.get("from") in declared:
            inputs[role] = {**source, "from": _pick(declared[source["from"]], values)[0]}
    policies: list[dict[str, Any]] = []
    for source in inputs.get("policies") or ():
        upstream = declared.get(source.get("from", ""))
        if upstream is None or not upstream.swept:
            policies.append(dict(source))
            continue
        for member in _pick(upstream, values):
            # A named policy keeps its name, with the member's values after it.
            label = source["name"] + member[len(source["from"]) :] if source.get("name") else member
            policies.append({**source, "from": member, "name": label})
    if "policies" in inputs:
        inputs["policies"] = policies
    if inputs:
        doc["inputs"] = inputs
    return doc


# ---------------------------------------------------------------------------- validation


def _value_errors(at: str, stage: Mapping[str, Any], key: str, values: Sequence[Any]) -> Iterator[str]:
    """Messages for the values of one sweep key, each naming ``sweep.<key>[<j>]``."""
    seen: dict[str, int] = {}
    base = stage.get("hyperparameters") or {}
    # What the stage's own hyperparameters already get wrong is reported there, not per value.
    before = set() if key == SEED else set(stages.hyperparameter_errors(stage["type"], base))
    for index, value in enumerate(values):
        where = f"{at}.sweep.{key}[{index}]"
        if key == SEED:
            if type(value) is not int or value < 0:
                yield f"{where}: must be {crdgen.expected(crdgen.SEED_PARAM)}"
        else:
            for message in stages.hyperparameter_errors(stage["type"], {**base, key: value}):
                if message in before:
                    continue
                field, reason = message.split(": ", 1)
                # A rule relating two fields names the other one: keep its name in the reason.
                yield f"{where}: {reason if field == f'hyperparameters.{key}' else message}"
        name = slug(value)
        if name in seen:
            yield (
                f"{where}: gives the same stage name as {key}[{seen[name]}] ({_key_slug(key)}-{name}); "
                "every value must be distinct"
            )
        seen.setdefault(name, index)


def errors(listed: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(path, message) for every sweep problem of ``spec.stages``; empty when they all expand."""
    found: list[tuple[str, str]] = []
    swept_keys: dict[str, set[str]] = {}  # declared name -> every key its members carry
    for index, stage in enumerate(listed):
        at = f"spec.stages[{index}]"
        sweep: Mapping[str, Sequence[Any]] = stage.get("sweep") or {}
        entry = CATALOGUE.get(stage.get("type", ""))
        known = {p.name for p in entry.params} if entry else set()
        inputs = stage.get("inputs") or {}
        inherited: dict[str, str] = {}
        for role in SINGLE_ROLES:
            upstream = str((inputs.get(role) or {}).get("from", ""))
            for key in swept_keys.get(upstream, ()):
                inherited.setdefault(key, upstream)
        for key, values in sweep.items():
            where = f"{at}.sweep.{key}"
            if key != SEED and key not in known and entry is not None:
                found.append((where, crdgen.sweep_unknown_message(entry.name)))
                continue
            if key in (stage.get("hyperparameters") or {}):
                found.append((where, f"also set in hyperparameters.{key}: set it in one place"))
            if key == SEED and "seed" in stage:
                found.append((where, "also set as this stage's seed: set it in one place"))
            if key in inherited:
                found.append(
                    (
                        where,
                        f"stage {inherited[key]}, which this stage reads, already sweeps {key}: "
                        "its members pass it on",
                    )
                )
            for message in _value_errors(at, stage, key, values):
                path, reason = message.split(": ", 1)
                found.append((path, reason))
        count = 1
        for values in sweep.values():
            count *= len(values)
        if count > MAX_MEMBERS:
            found.append((f"{at}.sweep", f"{count} combinations; at most {MAX_MEMBERS} per stage"))
        if sweep or inherited:
            swept_keys[stage["name"]] = set(sweep) | set(inherited)
    if found:
        return found
    expanded = expand(listed)
    if len(expanded) > MAX_STAGES:
        found.append(("spec.stages", f"sweeps expand to {len(expanded)} stages; at most {MAX_STAGES}"))
    names: dict[str, str] = {}
    for doc, member in expanded:
        origin = member.of if member else doc["name"]
        if doc["name"] in names and names[doc["name"]] != origin:
            index = [s["name"] for s in listed].index(origin)
            found.append(
                (
                    f"spec.stages[{index}].name",
                    f"sweep member {doc['name']!r} of stage {origin} clashes with stage {names[doc['name']]}",
                )
            )
        names[doc["name"]] = origin
    return found
