"""Install-wide defaults for what a run's spec leaves out: the trainer image and storage settings.

A platform team usually has one trainer image, one S3-compatible store, one conventional
credentials Secret name per namespace and, with Kueue, one LocalQueue name. The Helm chart's
``defaultTrainerImage``, ``s3.endpoint``, ``s3.region``, ``s3.credentialsSecret``,
``kueue.defaultQueueName`` and ``tracking.mlflow`` values reach the operator as environment
variables; a run that sets a field itself always keeps it (``spec.tracking: {}`` opts a run out
of the default tracker). ``gpuMemory`` (one GPU's memory) is not a spec
default: `kubealign.fit` checks stages against it.

The defaults are applied to the manifest the operator reads, before validation and rendering, so
every consumer (stage configs, trainer env, status) sees the same effective spec. The stored
object is never rewritten: ``kubectl get alr -o yaml`` still shows what the user wrote.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

ENV_IMAGE: Final = "KUBEALIGN_DEFAULT_IMAGE"
ENV_ENDPOINT: Final = "KUBEALIGN_DEFAULT_S3_ENDPOINT"
ENV_REGION: Final = "KUBEALIGN_DEFAULT_S3_REGION"
ENV_SECRET: Final = "KUBEALIGN_DEFAULT_S3_SECRET"
ENV_GPU_MEMORY: Final = "KUBEALIGN_GPU_MEMORY"
ENV_QUEUE_NAME: Final = "KUBEALIGN_DEFAULT_QUEUE_NAME"
ENV_MLFLOW_URI: Final = "KUBEALIGN_DEFAULT_MLFLOW_URI"
ENV_MLFLOW_EXPERIMENT: Final = "KUBEALIGN_DEFAULT_MLFLOW_EXPERIMENT"
ENV_MLFLOW_SECRET: Final = "KUBEALIGN_DEFAULT_MLFLOW_SECRET"


@dataclass(frozen=True)
class InstallDefaults:
    """Defaults for ``spec.image`` and for ``spec.storage`` of ``s3://`` runs; None sets nothing."""

    image: str | None = None
    endpoint: str | None = None
    region: str | None = None
    secret_name: str | None = None
    gpu_memory: str | None = None  # memory of one GPU, a quantity such as 80Gi (kubealign.fit)
    queue_name: str | None = None  # Kueue LocalQueue for runs that set no spec.queueName
    mlflow_uri: str | None = None  # MLflow tracking server for runs that set no spec.tracking
    mlflow_experiment: str | None = None
    mlflow_secret: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InstallDefaults:
        env = os.environ if environ is None else environ
        return cls(
            image=env.get(ENV_IMAGE) or None,
            endpoint=env.get(ENV_ENDPOINT) or None,
            region=env.get(ENV_REGION) or None,
            secret_name=env.get(ENV_SECRET) or None,
            gpu_memory=env.get(ENV_GPU_MEMORY) or None,
            queue_name=env.get(ENV_QUEUE_NAME) or None,
            mlflow_uri=env.get(ENV_MLFLOW_URI) or None,
            mlflow_experiment=env.get(ENV_MLFLOW_EXPERIMENT) or None,
            mlflow_secret=env.get(ENV_MLFLOW_SECRET) or None,
        )

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``manifest`` with the defaults filled into ``spec`` where it has none."""
        result = copy.deepcopy(dict(manifest))
        spec = result.get("spec")
        if not isinstance(spec, dict):
            return result
        # Only an absent image: an empty one is invalid, and validation should say so.
        if self.image and spec.get("image") is None:
            spec["image"] = self.image
        if self.queue_name and spec.get("queueName") is None:
            spec["queueName"] = self.queue_name
        if self.mlflow_uri and spec.get("tracking") is None:
            mlflow: dict[str, Any] = {"uri": self.mlflow_uri}
            if self.mlflow_experiment:
                mlflow["experiment"] = self.mlflow_experiment
            if self.mlflow_secret:
                mlflow["secretRef"] = {"name": self.mlflow_secret}
            spec["tracking"] = {"mlflow": mlflow}
        storage = spec.get("storage")
        # file:// stores need no endpoint or credentials; a malformed spec is left for validation to name.
        if not isinstance(storage, dict) or not str(storage.get("uri", "")).startswith("s3://"):
            return result
        if self.endpoint and not storage.get("endpoint"):
            storage["endpoint"] = self.endpoint
        if self.region and not storage.get("region"):
            storage["region"] = self.region
        if self.secret_name and not (storage.get("secretRef") or {}).get("name"):
            storage["secretRef"] = {"name": self.secret_name}
        return result
