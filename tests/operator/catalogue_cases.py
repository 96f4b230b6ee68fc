"""Bad-hyperparameter manifests generated from the stage catalogue, one per (stage type, field, fault).

For every stage type, in the pipeline of run_builders (pretrain, sft, generate, reward, dpo, ppo,
evaluate) and kto and grpo stages after it (each type at its own index), each hyperparameter gets a wrong
type, every bound it has a value just past it, every choice list a near miss, and each name a
misspelling. The offline tests (kubealign validate) and the cluster tests (the real API server's
admission policy) read the same cases, so a rule one door lacks fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubealign_jobs import stages
from kubealign_jobs.stages import CATALOGUE, Kind, Param
from tests.operator.run_builders import manifest, pipeline, src, stage, uri

# A value of another JSON type for each kind.
WRONG_TYPE: dict[Kind, Any] = {
    Kind.BOOL: "yes",
    Kind.INT: 2.5,
    Kind.FLOAT: "high",
    Kind.STR: 3,
    Kind.OBJECT: [1],
    Kind.NUMBERS: "0.5",
}


@dataclass(frozen=True)
class Case:
    id: str
    stage_type: str
    index: int
    name: str
    value: Any

    @property
    def path(self) -> str:
        return f"spec.stages[{self.index}].hyperparameters.{self.name}"

    def manifest(self) -> dict[str, Any]:
        stages = every_type()
        stages[self.index].setdefault("hyperparameters", {})[self.name] = self.value
        return manifest(stages, name=f"bad-{self.index}")


def _past_bounds(p: Param) -> list[tuple[str, Any]]:
    step = 1 if p.kind is Kind.INT else 0.5
    out: list[tuple[str, Any]] = []
    for label, bound, delta in (("ge", p.ge, -step), ("gt", p.gt, 0), ("le", p.le, step), ("lt", p.lt, 0)):
        if bound is None:
            continue
        value = bound + delta
        value = int(value) if p.kind is Kind.INT else float(value)
        out.append((label, [value] if p.kind is Kind.NUMBERS else value))
    return out


def every_type() -> list[dict[str, Any]]:
    """run_builders' pipeline and the stage types it does not use, so every type has an index."""
    return [
        *pipeline(),
        stage("kto", "kto", inputs={"model": src("sft"), "data": uri("s3://data/kto")}),
        stage("grpo", "grpo", inputs={"model": src("sft"), "data": uri("s3://data/math")}),
    ]


def _index(stage_type: str) -> int:
    return next(i for i, s in enumerate(every_type()) if s["type"] == stage_type)


def cases() -> list[Case]:
    out = []
    for name, entry in CATALOGUE.items():
        index = _index(name)
        for p in entry.params:
            at = f"{name}-{p.name}"
            out.append(Case(f"{at}-type", name, index, p.name, WRONG_TYPE[p.kind]))
            out.extend(Case(f"{at}-{label}", name, index, p.name, value) for label, value in _past_bounds(p))
            if p.choices:
                out.append(Case(f"{at}-choice", name, index, p.name, p.choices[0][:-1]))
            out.append(Case(f"{at}-unknown-name", name, index, p.name + "x", 1))
    return out


def every_default_manifest() -> dict[str, Any]:
    """The pipeline with every stage spelling out every hyperparameter at its catalogue default."""
    listed = every_type()
    for entry in listed:
        defaults = stages.defaults(entry["type"])
        # A null default (e.g. target_kl) means "unset"; a manifest leaves it out the same way.
        entry["hyperparameters"] = {
            **{k: v for k, v in defaults.items() if v is not None},
            **entry.get("hyperparameters", {}),
        }
    return manifest(listed, name="every-default")
