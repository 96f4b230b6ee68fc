"""Experiment tracking: rank 0 of each stage logs to MLflow, off the training thread.

One MLflow parent run per AlignmentRun and one child run per stage (a sweep member is a stage
of its own), in the experiment ``tracking.experiment`` of the stage config:

- params: the stage's hyperparameters (nested ones flattened with dots), its seed and input URIs;
- metrics: every number of every progress record at its step (``loss``, ``lr``, ``steps_per_s``,
  rewards, KL...), eval records as ``eval/<name>``, and the final metrics at the last step;
- tags: ``kubealign.run_uid``, ``kubealign.run``, ``kubealign.namespace``, ``kubealign.stage``,
  ``kubealign.type``, ``kubealign.job``, ``kubealign.attempt``, ``kubealign.artifact``.

Runs are found again by their tags, never remembered: a retried or resumed attempt continues its
stage's child run (status back to RUNNING, the attempt tag updated, params it already has kept)
instead of starting a new one. Steps a killed attempt logged after its last checkpoint are not
logged again by the attempt that replays them (a resume replays them exactly): every step has one
value. Two stages starting at once may both create the parent; each then re-reads, keeps the
oldest and deletes its own, so they converge on one. The parent's status follows its children:
RUNNING while one runs (or was stopped by SIGTERM, KILLED: its next pod resumes), else FAILED if
one failed, else FINISHED; a retried stage that succeeds turns FAILED back into FINISHED. Stages
that have not started yet have no child run: only the operator knows when the whole run has
ended, and it never talks to the tracker.

A tracker that is down, slow or refusing never fails or slows a stage: calls happen on a
background thread from a bounded buffer, failures are logged once per outage and retried with
backoff, and ``finish`` waits at most ``KUBEALIGN_TRACKING_FLUSH_SECONDS`` (60 s) for the buffer to
drain while the tracker answers, and a few seconds when it does not. MLflow's own HTTP retries
(minutes, by default) are turned down to one short try each: the backoff here replaces them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubealign_jobs.config import StageConfig

log = logging.getLogger(__name__)

FLUSH_ENV: Final = "KUBEALIGN_TRACKING_FLUSH_SECONDS"
DEFAULT_FLUSH_SECONDS: Final = 60.0
UNREACHABLE_FLUSH_SECONDS: Final = 3.0
MAX_BUFFERED: Final = 100_000  # metric values kept while the tracker is down; the oldest go first
BATCH_METRICS: Final = 1000  # MLflow's log-batch limits
BATCH_PARAMS: Final = 100
PARAM_VALUE_LIMIT: Final = 6000
BACKOFF_SECONDS: Final = (1.0, 2.0, 5.0, 10.0, 30.0)

# Keys of a progress record that are not metrics: identity and counters.
NOT_METRICS: Final = frozenset({"stage", "type", "step", "total_steps", "event"})

TAG_RUN_UID: Final = "kubealign.run_uid"
TAG_KIND: Final = "kubealign.kind"
TAG_STAGE: Final = "kubealign.stage"
PARENT_TAG: Final = "mlflow.parentRunId"


@dataclass(frozen=True)
class Identity:
    """Who is logging: the AlignmentRun, the stage, and which attempt of its Job."""

    run: str
    run_uid: str
    namespace: str
    stage: str
    type: str
    job: str
    attempt: str
    artifact: str

    @classmethod
    def of(cls, config: StageConfig, environ: Mapping[str, str] | None = None) -> Identity:
        env = os.environ if environ is None else environ
        return cls(
            run=config.run,
            # Without the run's uid (a config written by hand), the namespace and name stand in.
            run_uid=config.tracking.run_uid or f"{config.namespace}/{config.run}",
            namespace=config.namespace,
            stage=config.stage,
            type=config.type,
            job=env.get("KUBEALIGN_JOB", ""),
            attempt=env.get("KUBEALIGN_ATTEMPT", "0"),
            artifact=config.artifact,
        )

    def parent_tags(self) -> dict[str, str]:
        return {
            TAG_RUN_UID: self.run_uid,
            TAG_KIND: "run",
            "kubealign.run": self.run,
            "kubealign.namespace": self.namespace,
        }

    def stage_tags(self) -> dict[str, str]:
        tags = {
            TAG_RUN_UID: self.run_uid,
            TAG_KIND: "stage",
            TAG_STAGE: self.stage,
            "kubealign.run": self.run,
            "kubealign.namespace": self.namespace,
            "kubealign.type": self.type,
            "kubealign.attempt": self.attempt,
            "kubealign.artifact": self.artifact,
        }
        if self.job:
            tags["kubealign.job"] = self.job
        return tags


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"lora": {"r": 8}}`` as ``("lora.r", "8")``: MLflow params are flat strings."""
    for key in sorted(values):
        value = values[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, str(value)[:PARAM_VALUE_LIMIT]


def stage_params(config: StageConfig) -> dict[str, str]:
    """What a stage's child run records as params: hyperparameters, seed and inputs."""
    params = dict(flatten(config.hyperparameters))
    params["seed"] = str(config.seed)
    for role, uri in sorted(vars(config.inputs).items()):
        if isinstance(uri, str) and uri:
            params[f"input.{role}"] = uri[:PARAM_VALUE_LIMIT]
        elif isinstance(uri, dict):
            params.update((f"input.policies.{k}", v[:PARAM_VALUE_LIMIT]) for k, v in sorted(uri.items()))
    return params


def record_metrics(record: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
    """The (step, metrics) a progress or eval record carries for MLflow; None for other records."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    event = record.get("event")
    if event not in (None, "eval"):
        return None
    prefix = "eval/" if event == "eval" else ""
    metrics = {
        f"{prefix}{key}": float(value)
        for key, value in record.items()
        if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
    }
    return (step, metrics) if metrics else None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _Pending:
    """What the worker still has to send, in order; metric values are bounded."""

    def __init__(self) -> None:
        # (key, value, timestamp ms, step, from a progress or eval record: may replay a killed attempt's)
        self.metrics: list[tuple[str, float, int, int, bool]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.end: str | None = None
        self.dropped = 0

    def add_metrics(self, step: int, values: Mapping[str, float], *, replayable: bool = True) -> None:
        now = int(time.time() * 1000)
        self.metrics += [(key, value, now, step, replayable) for key, value in values.items()]
        excess = len(self.metrics) - MAX_BUFFERED
        if excess > 0:
            del self.metrics[:excess]
            self.dropped += excess

    def empty(self) -> bool:
        return not (self.metrics or self.params or self.tags or self.end)


class MlflowTracker:
    """Logs one stage to MLflow from a background thread; every public method returns at once."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        identity: Identity,
        params: Mapping[str, str],
        *,
        started: float | None = None,
    ) -> None:
        self.uri, self.experiment, self.identity = uri, experiment, identity
        # When the stage's process started: the run is created a few seconds later, in the background.
        self.started_ms = int((started if started is not None else time.time()) * 1000)
        self.run_id: str | None = None
        self._pending = _Pending()
        self._pending.params.update(params)
        self._pending.tags.update(identity.stage_tags())
        self._lock = threading.Condition()
        self._closing = False
        self._healthy = True
        self._failures = 0
        self._client: Any = None
        self._parent_id: str | None = None
        self._experiment: str | None = None
        # The last step an earlier attempt of this stage logged: a resumed attempt replays up to it.
        self._logged_through = 0
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- the training thread's side

    def log_record(self, record: Mapping[str, Any]) -> None:
        found = record_metrics(record)
        if found is None:
            return
        with self._lock:
            self._pending.add_metrics(*found)
            self._lock.notify()

    def finish(self, status: str, step: int | None = None, metrics: Mapping[str, Any] | None = None) -> None:
        """End the child run (FINISHED, FAILED or KILLED) after sending what is buffered."""
        with self._lock:
            if metrics and step is not None:
                values = record_metrics({"step": step, **metrics})
                if values is not None:
                    self._pending.add_metrics(*values, replayable=False)
            self._pending.end = status
            self._closing = True
            self._lock.notify()
        give_up = time.monotonic() + float(os.environ.get(FLUSH_ENV) or DEFAULT_FLUSH_SECONDS)
        unreachable = False
        while self._thread.is_alive() and time.monotonic() < give_up:
            with self._lock:
                healthy = self._healthy
            if not healthy and not unreachable:
                # A tracker that does not answer gets a few more seconds, not the whole deadline.
                unreachable = True
                give_up = min(give_up, time.monotonic() + UNREACHABLE_FLUSH_SECONDS)
            self._thread.join(timeout=max(0.0, min(give_up - time.monotonic(), 0.25)))
        if self._thread.is_alive():
            with self._lock:
                left = len(self._pending.metrics)
            log.warning("tracking: %s did not take the last %d metric values; they are lost", self.uri, left)

    # -------------------------------------------------------------- the worker

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._pending.empty() and not self._closing:
                    self._lock.wait()
                if self._pending.empty() and self._closing:
                    return
            try:
                if self.run_id is None:
                    self._open()
                self._send()
            except Exception as exc:
                self._failed(exc)
                continue
            if self._failures:
                log.info("tracking: %s answers again", self.uri)
            with self._lock:
                self._failures = 0
                self._healthy = True
                done = self._closing and self._pending.empty()
            if done:
                return

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._failures == 0:
                log.warning("tracking: %s: %s (the stage goes on; retrying in the background)", self.uri, exc)
            wait = BACKOFF_SECONDS[min(self._failures, len(BACKOFF_SECONDS) - 1)]
            self._failures += 1
            self._healthy = False
            # Closing: one more try after a short pause, then finish() stops waiting anyway.
            self._lock.wait(timeout=min(wait, 1.0) if self._closing else wait)

    def _open(self) -> None:
        """Find or create the experiment, the parent run and this stage's child run."""
        # One short try per HTTP call: the worker's backoff retries, not MLflow's (minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        client = self._client = self._client or MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id(client)
        parent = self._parent(client, experiment_id)
        uid, stage = _quote(self.identity.run_uid), _quote(self.identity.stage)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_RUN_UID}` = {uid} and tags.`{TAG_STAGE}` = {stage}",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
            with self._lock:
                # Params are write-once in MLflow: keep the ones the run has, warn where one changed.
                for key, value in run.data.params.items():
                    mine = self._pending.params.pop(key, None)
                    if mine is not None and mine != value:
                        log.warning(
                            "tracking: param %s was %r, now %r; MLflow keeps the first", key, value, mine
                        )
            self._logged_through = max(
                (m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)),
                default=0,
            )
            log.info(
                "tracking: continuing MLflow run %s of stage %s (steps logged through %d)",
                run.info.run_id,
                self.identity.stage,
                self._logged_through,
            )
            self.run_id = run.info.run_id
        else:
            tags = {**self.identity.stage_tags(), PARENT_TAG: parent}
            run = client.create_run(
                experiment_id, start_time=self.started_ms, tags=tags, run_name=self.identity.stage
            )
            log.info("tracking: MLflow run %s for stage %s", run.info.run_id, self.identity.stage)
            self.run_id = run.info.run_id
        client.update_run(parent, status="RUNNING")
        self._parent_id, self._experiment = parent, experiment_id

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            # MLflow's UI opens a model-training experiment on its runs, not on GenAI traces.
            kind = {"mlflow.experimentKind": "custom_model_development"}
            return str(client.create_experiment(self.experiment, tags=kind))
        except Exception:
            # Another stage created it in between.
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def _parent(self, client: Any, experiment_id: str) -> str:
        query = f"tags.`{TAG_RUN_UID}` = {_quote(self.identity.run_uid)} and tags.`{TAG_KIND}` = 'run'"

        def oldest() -> str | None:
            runs = client.search_runs(
                [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=50
            )
            if not runs:
                return None
            return str(min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id)

        found = oldest()
        if found is not None:
            return found
        mine = client.create_run(
            experiment_id,
            start_time=self.started_ms,
            tags=self.identity.parent_tags(),
            run_name=self.identity.run,
        )
        winner = oldest() or mine.info.run_id
        if winner != mine.info.run_id:
            client.delete_run(mine.info.run_id)  # another stage's parent came first
        return winner

    def _send(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self._client, self.run_id
        with self._lock:
            metrics = self._pending.metrics[:BATCH_METRICS]
            params = dict(list(self._pending.params.items())[:BATCH_PARAMS])
            tags = dict(list(self._pending.tags.items())[:BATCH_PARAMS])
            end = self._pending.end if len(metrics) == len(self._pending.metrics) else None
            dropped, self._pending.dropped = self._pending.dropped, 0
        if dropped:
            log.warning("tracking: %d metric values were dropped while %s was unreachable", dropped, self.uri)
        fresh = [
            Metric(key, value, ts, step)
            for key, value, ts, step, replayable in metrics
            if not (replayable and step <= self._logged_through)
        ]
        if fresh or params or tags:
            client.log_batch(
                run_id,
                metrics=fresh,
                params=[Param(key, value) for key, value in params.items()],
                tags=[RunTag(key, value) for key, value in tags.items()],
            )
        with self._lock:
            del self._pending.metrics[: len(metrics)]
            for key in params:
                self._pending.params.pop(key, None)
            for key in tags:
                self._pending.tags.pop(key, None)
        if end is not None and not (self._pending.params or self._pending.tags):
            client.set_terminated(run_id, status=end)
            client.update_run(self._parent_id, status=self._parent_status(client))
            with self._lock:
                self._pending.end = None

    def _parent_status(self, client: Any) -> str:
        """RUNNING while a child runs or will resume (KILLED), else FAILED if one failed, else FINISHED."""
        children = client.search_runs(
            [self._experiment], filter_string=f"tags.`{PARENT_TAG}` = {_quote(str(self._parent_id))}"
        )
        statuses = {child.info.status for child in children}
        if statuses & {"RUNNING", "SCHEDULED", "KILLED"}:
            return "RUNNING"
        return "FAILED" if "FAILED" in statuses else "FINISHED"


def start(config: StageConfig, *, is_main: bool, started: float | None = None) -> MlflowTracker | None:
    """The stage's tracker, on rank 0 of a stage whose config names an MLflow tracking URI."""
    if not is_main or not config.tracking.mlflow_uri:
        return None
    return MlflowTracker(
        config.tracking.mlflow_uri,
        config.tracking.experiment,
        Identity.of(config),
        stage_params(config),
        started=started,
    )
