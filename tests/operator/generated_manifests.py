"""Manifests generated from the CRD's own schema, to hold `kubealign validate` to what the API
server decides: every integer and quantity field of the spec is set, one at a time, to values at
and just past its bounds (the schema's minimum and maximum, its format's int32/int64 range) and
far beyond them, into an otherwise valid run that sets every optional field of a stage.

tests/cluster/test_operator_api.py sends each one to the real API server (a server-side dry run)
and compares its verdict with `api.validate`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from kubealign import api
from tests.operator.run_builders import manifest, pipeline

Path = tuple[str | int, ...]

FAR = (10**30, -(10**30), 2**31, 2**63, -1, 0)


def base() -> dict[str, Any]:
    """A valid run whose first stage sets every optional scheduling field the generator varies."""
    stages = pipeline()
    stages[0].update(
        maxRetries=1,
        seed=3,
        terminationGracePeriodSeconds=60,
        timeoutSeconds=3600,
        resources={"nodes": 1, "gpusPerNode": 1, "cpu": "4", "memory": "16Gi"},
        tolerations=[
            {
                "key": "gpu",
                "operator": "Equal",
                "value": "a100",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            }
        ],
        nodeSelector={"pool": "gpu"},
    )
    body = manifest(stages, name="generated", seed=1)
    body["metadata"] = {"name": "generated"}
    return body


def _leaves(node: Mapping[str, Any], path: Path) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    if node.get("type") == "integer" or node.get("x-kubernetes-int-or-string"):
        yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _leaves(child, (*path, name))
    if isinstance(node.get("items"), Mapping):
        yield from _leaves(node["items"], (*path, 0))


def _exists(body: Any, path: Path) -> bool:
    """Whether the parent of ``path`` is in ``body`` (the leaf itself may be absent)."""
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(body, list) or len(body) <= part:
                return False
        elif not isinstance(body, dict) or part not in body:
            return False
        body = body[part]
    return isinstance(body, dict)


def _values(schema: Mapping[str, Any]) -> list[Any]:
    low, high = api.INTEGER_RANGES.get(str(schema.get("format")), (None, None))
    bounds = [schema.get("minimum", low), schema.get("maximum", high)]
    values: set[int | str] = {*FAR}
    for bound in bounds:
        if bound is not None:
            values |= {bound - 1, bound, bound + 1}
    if schema.get("x-kubernetes-int-or-string"):  # a quantity: strings too
        values |= {"4096", "4097", "64Ti", "65Ti", "1e30", "-1", "0.5", "1.5e3", "100000000m"}
    return sorted(values, key=lambda v: (isinstance(v, str), str(v) if isinstance(v, str) else v))


def generated() -> list[tuple[str, dict[str, Any]]]:
    """(id, manifest) for every integer or quantity field of the spec and every value to try."""
    template = base()
    spec = api.openapi_schema()["properties"]["spec"]
    cases = []
    for path, schema in _leaves(spec, ("spec",)):
        if not _exists(template, path):
            continue
        for value in _values(schema):
            body = copy.deepcopy(template)
            target: Any = body
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
            name = ".".join(str(part) for part in path)
            cases.append((f"{name}={value}", body))
    return cases
