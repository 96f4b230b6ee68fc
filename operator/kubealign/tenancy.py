"""What a platform team lets the creators of AlignmentRuns choose: images, ServiceAccounts, priority
classes, tolerations and pod annotations.

Whoever may create a run chooses what its pods run as and where. The chart's ``tenancy`` values
bound that twice: at admission, in a ValidatingAdmissionPolicy the chart renders from the same
values (charts/kubealign/templates/tenancypolicy.yaml), and here, in the operator, which reports a
run the policy refuses as ``Valid=False`` naming the field and starts nothing (a run created before
the policy, or while it was off, is still held to it). The chart passes the values as JSON in
``KUBEALIGN_TENANCY_POLICY``.

An empty allow-list allows everything of its kind. Two rules need no list: a toleration without a
key (``operator: Exists`` tolerates every taint, the control plane's included) is refused unless
``allowBlanketTolerations``, and with ``allowedPodAnnotationPrefixes`` set, an annotation outside
those prefixes is refused (an AppArmor ``unconfined`` annotation, for example).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubealign.api import FieldError

ENV_POLICY: Final = "KUBEALIGN_TENANCY_POLICY"


@dataclass(frozen=True)
class TenancyPolicy:
    image_prefixes: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ()
    annotation_prefixes: tuple[str, ...] = ()
    allow_blanket_tolerations: bool = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TenancyPolicy:
        """From the chart's ``tenancy`` values (the JSON the chart hands the operator)."""

        def strings(key: str) -> tuple[str, ...]:
            items = values.get(key) or ()
            if not isinstance(items, Sequence) or isinstance(items, str):
                raise ValueError(f"{ENV_POLICY}: {key} must be a list of strings")
            return tuple(str(item) for item in items)

        return cls(
            image_prefixes=strings("allowedImagePrefixes"),
            service_accounts=strings("allowedServiceAccounts"),
            priority_classes=strings("allowedPriorityClasses"),
            toleration_keys=strings("allowedTolerationKeys"),
            annotation_prefixes=strings("allowedPodAnnotationPrefixes"),
            allow_blanket_tolerations=bool(values.get("allowBlanketTolerations", True)),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TenancyPolicy:
        text = (os.environ if environ is None else environ).get(ENV_POLICY, "")
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_POLICY}: not JSON: {exc}") from exc
        if not isinstance(values, Mapping):
            raise ValueError(f"{ENV_POLICY}: expected a JSON object")
        return cls.from_values(values)

    def violations(self, manifest: Mapping[str, Any]) -> list[FieldError]:
        """Every choice of the run's spec this policy refuses, in manifest order."""
        spec = manifest.get("spec")
        if not isinstance(spec, Mapping):
            return []
        return list(self._violations(spec))

    def _violations(self, spec: Mapping[str, Any]) -> Iterator[FieldError]:
        yield from self._image("spec.image", spec.get("image"))
        account = spec.get("serviceAccountName")
        if self.service_accounts and account is not None and account not in self.service_accounts:
            yield FieldError(
                "spec.serviceAccountName",
                f"{account!r} is not an allowed ServiceAccount ({_list(self.service_accounts)})",
            )
        priority = spec.get("priorityClassName")
        if self.priority_classes and priority is not None and priority not in self.priority_classes:
            yield FieldError(
                "spec.priorityClassName",
                f"{priority!r} is not an allowed priority class ({_list(self.priority_classes)})",
            )
        yield from self._annotations("spec.podAnnotations", spec.get("podAnnotations"))
        stages = spec.get("stages")
        for index, stage in enumerate(stages if isinstance(stages, Sequence) else ()):
            if not isinstance(stage, Mapping):
                continue
            at = f"spec.stages[{index}]"
            yield from self._image(f"{at}.image", stage.get("image"))
            yield from self._annotations(f"{at}.podAnnotations", stage.get("podAnnotations"))
            tolerations = stage.get("tolerations")
            for number, toleration in enumerate(tolerations if isinstance(tolerations, Sequence) else ()):
                if isinstance(toleration, Mapping):
                    yield from self._toleration(f"{at}.tolerations[{number}]", toleration)

    def _image(self, path: str, image: Any) -> Iterator[FieldError]:
        if self.image_prefixes and image is not None and not str(image).startswith(self.image_prefixes):
            yield FieldError(
                path, f"{image!r} does not start with an allowed prefix ({_list(self.image_prefixes)})"
            )

    def _annotations(self, path: str, annotations: Any) -> Iterator[FieldError]:
        if not self.annotation_prefixes or not isinstance(annotations, Mapping):
            return
        for key in annotations:
            if not str(key).startswith(self.annotation_prefixes):
                yield FieldError(
                    f"{path}[{key}]",
                    f"annotation not allowed (allowed prefixes: {_list(self.annotation_prefixes)})",
                )

    def _toleration(self, path: str, toleration: Mapping[str, Any]) -> Iterator[FieldError]:
        key = toleration.get("key") or ""
        if not key:
            if not self.allow_blanket_tolerations:
                yield FieldError(
                    f"{path}.key", "a toleration without a key tolerates every taint; name the taint's key"
                )
            return
        if self.toleration_keys and key not in self.toleration_keys:
            yield FieldError(
                f"{path}.key", f"{key!r} is not an allowed toleration key ({_list(self.toleration_keys)})"
            )


def _list(items: Sequence[str]) -> str:
    return ", ".join(items)
