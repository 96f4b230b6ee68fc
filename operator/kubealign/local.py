"""Run an AlignmentRun on this machine: ``kubealign run MANIFEST --local [--workdir DIR]``.

The local runner is the operator without Kubernetes. It uses the operator's own pieces, so a
manifest behaves the same here as on a cluster:

- validation is ``kubealign.api.validate`` (the CRD's schema and the Python twins of its CEL
  rules), with errors named ``file:line: field: message`` as ``kubealign validate`` prints them;
- each stage attempt is an ``plan.ObservedJob`` and ``plan.decide`` says what to start next (a
  stage whose inputs have all succeeded, or the next attempt of a failed stage while
  ``maxRetries`` allows), ``plan.summarize`` computes the status;
- the stage-config document is ``render.stage_config``, written to ``<workdir>/configs/<stage>.json``;
- each attempt is a subprocess ``python -m kubealign_jobs.<type> --config <that file>``; its final
  metrics come back through the termination message file (``KUBEALIGN_TERMINATION_LOG``).

This module never imports torch: it only spawns processes.

Differences from the cluster, all because there is one machine and no object store by default:

- storage: ``file://`` storage in the manifest is placed under ``<workdir>/storage``, so a run's
  outputs and its status live together; ``s3://`` storage is used as is (credentials from env);
- input URIs ``file://./path`` and ``file://../path`` are relative to the manifest's folder, so
  an example's manifest runs from any checkout (they are local-only: a pod has no such folder);
- every stage runs on this machine (``resources.nodes`` > 1 runs as one node), with an equal
  share of its cores (``--max-parallel`` stages at once, CPUs / max-parallel threads each);
- each stage runs as ``--processes N`` CPU processes (default 1; the trainer starts them under
  torchrun with gloo, as a pod does with its GPUs), so DDP and FSDP run here exactly as on a node;
- a stage whose artifact is complete (its ``_MANIFEST.json`` is there) is skipped on a rerun; an
  unfinished one starts again with the same config, so the trainer resumes from its checkpoint.

Layout of the workdir::

    status.json                   the run's status, shaped like the custom resource's .status
    mlflow.db                     the MLflow tracking store (sqlite), unless --mlflow says otherwise
    run-uid                       the run's identity in the tracker, so a rerun continues its runs
    configs/<stage>.json          the stage-config documents
    logs/<stage>.log              stdout and stderr of every attempt, appended
    logs/<stage>.termination.json the latest attempt's termination message
    storage/<namespace>/<run>/<stage>/   artifacts, checkpoints and metrics (file:// storage)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, TextIO
from urllib.parse import urlparse

import yaml

from kubealign import api, plan, render
from kubealign.progress import (
    Display,
    Progress,
    StageView,
    format_duration,
    metrics_table,
    parse_record,
    stage_table,
)

EXIT_SUCCEEDED: Final = 0
EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
EXIT_INTERRUPTED: Final = 130

STATUS_FILE: Final = "status.json"
# Metrics the termination message carries that say nothing about the stage's result.
BOOKKEEPING_KEYS: Final = frozenset({"status", "stage", "artifact"})
_POLL_S: Final = 0.2
_REDRAW_S: Final = 0.5
_PR_SET_PDEATHSIG: Final = 1


class ManifestError(ValueError):
    """The manifest cannot be run; ``errors`` are ``file:line: field: message`` lines."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = tuple(errors)


@dataclass(frozen=True)
class LocalOptions:
    """How to run: where, how many stages at once, with which interpreter, how to show it."""

    workdir: Path
    max_parallel: int
    python: str = sys.executable
    interactive: bool = False
    grace_s: float = 30.0
    processes: int = 1
    mlflow: str | None = None  # --mlflow: a tracking URI, "off", or None for the default (see with_tracking)


def utc_now() -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes times."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def available_cpus() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_max_parallel() -> int:
    return min(2, available_cpus())


# --- the manifest -------------------------------------------------------------------------------


def load_manifest(path: Path) -> tuple[dict[str, Any], api.ManifestDocument]:
    """The one AlignmentRun in ``path``, validated; ``ManifestError`` names file, line and field."""
    try:
        documents = api.load_manifests(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError([f"{path}: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: {exc}"]) from exc
    runs = [doc for doc in documents if isinstance(doc.body, Mapping) and doc.body.get("kind") == api.KIND]
    if len(runs) != 1:
        where = f"{path}:{runs[1].start_line}" if len(runs) > 1 else str(path)
        raise ManifestError([f"{where}: expected exactly one {api.KIND} document, found {len(runs)}"])
    document = runs[0]
    errors = api.validate(document.body)
    if errors:
        raise ManifestError([f"{path}:{document.line_of(error.path)}: {error}" for error in errors])
    return dict(document.body), document


def _relative_path(uri: str) -> str | None:
    """The relative path of a ``file://./x`` or ``file://../x`` URI, else None."""
    rest = uri.removeprefix("file://")
    return rest if rest != uri and (rest.startswith("./") or rest.startswith("../")) else None


def _localize_source(source: api.InputSource | None, base: Path) -> api.InputSource | None:
    if source is None or source.uri is None:
        return source
    relative = _relative_path(source.uri)
    if relative is None:
        return source
    return replace(source, uri=(base / relative).resolve().as_uri())


def _localize_judge(hyperparameters: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """An evaluate stage's in-pod judge model given as ``file://./path``, relative to the manifest."""
    judge = hyperparameters.get("judge")
    model = judge.get("model") if isinstance(judge, Mapping) else None
    uri = model.get("uri") if isinstance(model, Mapping) else None
    relative = _relative_path(uri) if isinstance(uri, str) else None
    if relative is None or not isinstance(judge, Mapping):
        return dict(hyperparameters)
    located = {**judge, "model": {"uri": (base / relative).resolve().as_uri()}}
    return {**hyperparameters, "judge": located}


def localize(run: api.AlignmentRun, *, manifest_dir: Path, workdir: Path) -> api.AlignmentRun:
    """The run as this machine executes it: file storage under the workdir, relative inputs resolved."""
    storage = run.spec.storage
    if not storage.uri.startswith("s3://"):
        storage = replace(storage, uri=(workdir / "storage").resolve().as_uri())
    stages = []
    for stage in run.spec.stages:
        inputs = stage.inputs
        stages.append(
            replace(
                stage,
                hyperparameters=_localize_judge(stage.hyperparameters, manifest_dir),
                inputs=replace(
                    inputs,
                    model=_localize_source(inputs.model, manifest_dir),
                    data=_localize_source(inputs.data, manifest_dir),
                    eval_data=_localize_source(inputs.eval_data, manifest_dir),
                    reward_model=_localize_source(inputs.reward_model, manifest_dir),
                    reference=_localize_source(inputs.reference, manifest_dir),
                    policies=tuple(
                        p
                        for p in (_localize_source(p, manifest_dir) for p in inputs.policies)
                        if p is not None
                    ),
                ),
            )
        )
    return replace(run, spec=replace(run.spec, storage=storage, stages=tuple(stages)))


MLFLOW_OFF: Final = "off"
MLFLOW_ENV: Final = "KUBEALIGN_MLFLOW"
MLFLOW_DB: Final = "mlflow.db"
RUN_UID_FILE: Final = "run-uid"


def local_run_uid(workdir: Path) -> str:
    """The run's identity in the tracker, kept in the workdir: a rerun continues its MLflow runs,
    a fresh workdir starts new ones (a cluster uses the AlignmentRun's metadata.uid)."""
    path = workdir / RUN_UID_FILE
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"local-{uuid.uuid4()}\n")
    return path.read_text().strip()


def with_tracking(run: api.AlignmentRun, mlflow: str | None, workdir: Path) -> api.AlignmentRun:
    """Where the stages log: ``--mlflow URI``, else spec.tracking.mlflow, else a sqlite store at
    ``<workdir>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db`` shows
    it); ``--mlflow off`` logs nowhere."""
    if mlflow == MLFLOW_OFF:
        return replace(run, spec=replace(run.spec, mlflow=None))
    current = run.spec.mlflow
    if mlflow:
        tracking = replace(current, uri=mlflow) if current else api.MlflowTracking(uri=mlflow)
    elif current is not None:
        tracking = current
    else:
        tracking = api.MlflowTracking(uri=f"sqlite:///{(workdir / MLFLOW_DB).resolve()}")
    return replace(run, uid=run.uid or local_run_uid(workdir), spec=replace(run.spec, mlflow=tracking))


def missing_inputs(run: api.AlignmentRun, document: api.ManifestDocument, path: Path) -> list[str]:
    """``file://`` inputs that do not exist, named like validation errors (checked before anything runs)."""
    errors: list[str] = []
    roles = [(role, attr) for role, attr in api.SINGLE_ROLES]
    for index, stage in enumerate(run.spec.stages):
        sources: list[tuple[str, api.InputSource | None]] = [
            (f"inputs.{role}", getattr(stage.inputs, attr)) for role, attr in roles
        ]
        sources += [(f"inputs.policies[{i}]", p) for i, p in enumerate(stage.inputs.policies)]
        for where, source in sources:
            if source is None or source.uri is None or not source.uri.startswith("file://"):
                continue
            local = Path(urlparse(source.uri).path)
            if not local.exists():
                field_path = f"spec.stages[{index}].{where}.uri"
                errors.append(f"{path}:{document.line_of(field_path)}: {field_path}: {local} does not exist")
    return errors


# --- artifacts ----------------------------------------------------------------------------------


def artifact_complete(uri: str) -> bool:
    """Whether a stage's artifact is published (manifest present and consistent).

    The trainer package's storage layer decides, as it does when the trainer itself checks; it is
    imported here, not at the top, because only the local runner (which needs the trainer
    installed anyway) asks, and it pulls in no torch.
    """
    from kubealign_jobs import storage

    try:
        return storage.is_complete(uri)
    except storage.StorageError:
        return False


def stored_metrics(output: str) -> dict[str, Any] | None:
    """``<output>/metrics.json`` of a finished stage, when the status lost its metrics."""
    from kubealign_jobs import storage
    from kubealign_jobs.config import METRICS_FILE

    try:
        value = storage.read_json(storage.join(output, METRICS_FILE))
    except (OSError, ValueError, storage.StorageError):
        return None
    return value if isinstance(value, dict) else None


def finished_jobs(run: api.AlignmentRun, previous: api.RunStatus | None) -> list[plan.ObservedJob]:
    """A succeeded ``ObservedJob`` for every stage whose artifact is already complete: a rerun skips them.

    Times, attempts and metrics come from the previous status when it recorded the same stage as
    succeeded; otherwise from the stage's metrics file.
    """
    from kubealign_jobs import storage
    from kubealign_jobs.config import StorageSettings

    # The runner reads the store as the stages do: the manifest's endpoint, else AWS_ENDPOINT_URL.
    storage.configure(StorageSettings(endpoint=run.spec.storage.endpoint, region=run.spec.storage.region))
    jobs = []
    now = utc_now()
    for stage in run.spec.stages:
        if not artifact_complete(render.stage_artifact(run, stage)):
            continue
        before = previous.stage(stage.name) if previous else None
        recorded = (
            before
            if before is not None and before.phase == api.StagePhase.SUCCEEDED and before.job_name
            else None
        )
        attempt = recorded.attempts if recorded else 1
        jobs.append(
            plan.ObservedJob(
                name=(recorded.job_name if recorded else None)
                or render.job_name(run.name, stage.name, attempt),
                stage=stage.name,
                attempt=attempt,
                state=plan.JobState.SUCCEEDED,
                created=(recorded.start_time if recorded else None) or now,
                finished=(recorded.completion_time if recorded else None) or now,
                message="",
                metrics=(recorded.metrics if recorded and recorded.metrics is not None else None)
                or stored_metrics(render.stage_output(run, stage))
                or {},
            )
        )
    return jobs


def read_status(path: Path) -> api.RunStatus | None:
    try:
        return api.RunStatus.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def write_status(path: Path, status: api.RunStatus) -> None:
    """Replace ``status.json`` atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def interrupted_status(status: api.RunStatus, jobs: Mapping[str, str], signal_name: str) -> api.RunStatus:
    """The run after Ctrl-C: Failed with reason Interrupted; the stopped stages say so.

    ``jobs`` maps the stopped stages to their Job names. Finished stages keep their artifacts and
    status; a rerun skips them and resumes the stopped ones from their checkpoints.
    """
    message = f"interrupted by {signal_name}; rerun to resume from the latest checkpoint"
    now = utc_now()
    stages = tuple(
        replace(s, phase=api.StagePhase.FAILED, message=message, completion_time=s.completion_time or now)
        if jobs.get(s.name) == s.job_name and s.job_name
        else s
        for s in status.stages
    )
    # Condition type -> its status after the interruption (None: unchanged).
    after = {"Failed": "True", "Progressing": "False", "Ready": None}
    conditions = [
        replace(c, status=after[c.type] or c.status, reason="Interrupted", message=message)
        if c.type in after
        else c
        for c in status.conditions
    ]
    return replace(
        status,
        phase=api.RunPhase.FAILED,
        stages=stages,
        conditions=tuple(conditions),
        completion_time=status.completion_time or now,
        running_stages="",
    )


# --- attempts -----------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One running stage attempt: the process and what its output said so far (main thread only)."""

    stage: api.Stage
    job: plan.ObservedJob
    process: subprocess.Popen[bytes]
    termination_path: Path
    reader: threading.Thread
    started: float
    first: Progress | None = None
    latest: Progress | None = None


def _pdeathsig() -> Any:
    """A pre-exec hook that makes the kernel SIGTERM a stage when the runner dies, even by SIGKILL.

    The C function is looked up here, in the parent: between fork and exec the child calls one
    libc function and nothing else, which is what makes a pre-exec hook safe beside threads.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    term = int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, term)

    return hook


def _pump(stream: IO[bytes], log: IO[bytes], job: str, lines: queue.Queue[tuple[str, str, float]]) -> None:
    """Copy a stage's output into its log and hand each line to the main thread."""
    for raw in iter(stream.readline, b""):
        log.write(raw)
        log.flush()
        lines.put((job, raw.decode("utf-8", errors="replace"), time.monotonic()))
    stream.close()


def _termination_message(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code} (Error)"


class LocalRunner:
    """Runs one localized AlignmentRun to the end (or until interrupted)."""

    def __init__(self, run: api.AlignmentRun, options: LocalOptions, out: TextIO) -> None:
        self.run = run
        self.options = options
        self.workdir = options.workdir
        self.display = Display(out, interactive=options.interactive)
        self.jobs: dict[str, plan.ObservedJob] = {}
        self.attempts: dict[str, Attempt] = {}
        self.lines: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.stop_signal: int | None = None
        self.started = time.monotonic()
        self.previous: api.RunStatus | None = None
        self.status = api.RunStatus()
        self._pre_exec = _pdeathsig()

    # paths

    @property
    def status_path(self) -> Path:
        return self.workdir / STATUS_FILE

    def config_path(self, stage: api.Stage) -> Path:
        return self.workdir / "configs" / f"{stage.name}.json"

    def log_path(self, stage: api.Stage) -> Path:
        return self.workdir / "logs" / f"{stage.name}.log"

    # the loop

    def execute(self) -> int:
        for sub in ("configs", "logs", "scratch"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.previous = read_status(self.status_path)
        for job in finished_jobs(self.run, self.previous):
            self.jobs[job.name] = job
            self.display.print(f"{job.stage}: artifact complete, skipped")
        for stage in self.run.spec.stages:
            self.config_path(stage).write_text(render.stage_config(self.run, stage).to_json() + "\n")
        self._refresh(force=True)
        last_draw = 0.0
        while True:
            if self.stop_signal is not None:
                return self._stop()
            self._drain_lines(timeout=_POLL_S)
            self._reap()
            self._launch_ready()
            changed = self._refresh()
            if changed or time.monotonic() - last_draw >= _REDRAW_S:
                self._draw()
                last_draw = time.monotonic()
            if not self.attempts:
                break
        self._draw()
        self.display.close()
        return EXIT_SUCCEEDED if self.status.phase == api.RunPhase.SUCCEEDED else EXIT_FAILED

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: the loop stops the stages and records the interruption.

        A second signal while the stages are being stopped kills them at once, as a second
        Ctrl-C does in most tools; their published checkpoints stay valid either way.
        """
        if self.stop_signal is not None:
            for attempt in list(self.attempts.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(attempt.process.pid, signal.SIGKILL)
        self.stop_signal = signum

    def _launch_ready(self) -> None:
        """Start what the planner says can start, up to ``max_parallel`` stages at once."""
        creates = [
            a for a in plan.decide(self.run, tuple(self.jobs.values())) if isinstance(a, plan.CreateAttempt)
        ]
        free = self.options.max_parallel - len(self.attempts)
        for action in creates[: max(0, free)]:
            self._launch(self.run.spec.stage(action.stage), action.attempt)

    def _threads_env(self) -> dict[str, str]:
        """Each stage gets an equal, fixed share of the cores (unless the user set OMP_NUM_THREADS).

        torch starts a thread per core in every process; two trainers side by side would then
        oversubscribe the cores, and OpenMP threads that wait on each other slow down many times
        over (measured here: a tiny SFT stage took 3.5x as long with 2 threads on a busy 2-core
        machine as with 1). A fixed share also keeps a stage's speed the same whether or not
        another one starts beside it.
        """
        if "OMP_NUM_THREADS" in os.environ:
            return {}
        threads = str(max(1, available_cpus() // (self.options.max_parallel * self.options.processes)))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def _launch(self, stage: api.Stage, attempt: int) -> None:
        name = render.job_name(self.run.name, stage.name, attempt)
        termination = self.workdir / "logs" / f"{stage.name}.termination.json"
        termination.unlink(missing_ok=True)
        env = {
            **os.environ,
            **render.trainer_env(self.run, stage, attempt),
            "KUBEALIGN_TERMINATION_LOG": str(termination),
            "KUBEALIGN_SCRATCH": str(self.workdir / "scratch" / stage.name),
            "TOKENIZERS_PARALLELISM": "false",
            # Offline unless the caller's environment says otherwise: HF_HUB_OFFLINE=0 (and HF_TOKEN
            # for private repositories) lets hf:// inputs download on this machine.
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            **self._threads_env(),
            # One machine: a multi-node stage runs as a single node of --processes processes here.
            "NNODES": "1",
            "NPROC_PER_NODE": str(self.options.processes),
        }
        command = [self.options.python, *render.trainer_args(stage, str(self.config_path(stage)))]
        log = self.log_path(stage).open("ab")
        # A killed attempt may have left half a line; every header starts a line of its own.
        separator = "\n" if log.tell() else ""
        log.write(f"{separator}=== {utc_now()} attempt {attempt} ({name}): {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            # Its own process group: Ctrl-C reaches the runner alone, which stops the stages in
            # order (and torchrun's workers with their launcher) instead of racing them.
            start_new_session=True,
            preexec_fn=self._pre_exec,  # noqa: PLW1509 - the hook only calls prctl, see _pdeathsig
        )
        assert process.stdout is not None
        reader = threading.Thread(target=_pump, args=(process.stdout, log, name, self.lines), daemon=True)
        reader.start()
        job = plan.ObservedJob(
            name=name, stage=stage.name, attempt=attempt, state=plan.JobState.ACTIVE, created=utc_now()
        )
        self.jobs[name] = job
        self.attempts[name] = Attempt(
            stage=stage,
            job=job,
            process=process,
            termination_path=termination,
            reader=reader,
            started=time.monotonic(),
        )

    def _drain_lines(self, *, timeout: float) -> None:
        try:
            job, line, at = self.lines.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._on_line(job, line, at)
            try:
                job, line, at = self.lines.get_nowait()
            except queue.Empty:
                return

    def _on_line(self, job: str, line: str, at: float) -> None:
        attempt = self.attempts.get(job)
        record = parse_record(line)
        if attempt is None or record is None:
            return
        event = record.get("event")
        step = record.get("step")
        if event is None and isinstance(step, int):
            progress = Progress.from_record(record, at=at)
            attempt.latest = progress
            if attempt.first is None:
                attempt.first = progress
        elif event == "resumed":
            attempt.first = Progress.from_record(record, at=at)
            self.display.print(
                f"{attempt.stage.name}: resumed from step {step} ({record.get('checkpoint', '')})"
            )
        elif event == "already_complete":
            self.display.print(f"{attempt.stage.name}: artifact already complete")
        elif event == "error":
            self.display.print(f"{attempt.stage.name}: {record.get('error', 'error')}")

    def _reap(self) -> None:
        for name, attempt in list(self.attempts.items()):
            code = attempt.process.poll()
            if code is None:
                continue
            attempt.reader.join()
            self._drain_lines(timeout=0)
            del self.attempts[name]
            self.jobs[name] = self._finished(attempt, code)

    def _finished(self, attempt: Attempt, code: int, *, interrupted: str | None = None) -> plan.ObservedJob:
        message = _termination_message(attempt.termination_path)
        now = utc_now()
        if code == 0 and interrupted is None:
            return replace(
                attempt.job, state=plan.JobState.SUCCEEDED, finished=now, message="", metrics=message or {}
            )
        if interrupted is not None:
            text = f"interrupted by {interrupted}"
        elif message is not None:
            text = plan.failure_text(_exit_description(code), json.dumps(message, sort_keys=True))
        else:
            text = plan.failure_text(_exit_description(code), _log_tail(self.log_path(attempt.stage)))
        return replace(attempt.job, state=plan.JobState.FAILED, finished=now, message=text)

    def _refresh(self, *, force: bool = False) -> bool:
        """Recompute the status from the attempts (as the operator does from Jobs); write it if it changed."""
        status = plan.summarize(self.run, tuple(self.jobs.values()), self.previous, (), utc_now())
        changed = status != self.status
        if changed or force:
            self.status = status
            self.previous = status
            write_status(self.status_path, status)
        return changed

    def _stop(self) -> int:
        """Stop every running stage (SIGINT, then SIGKILL after the grace period) and record it."""
        signal_name = signal.Signals(self.stop_signal or signal.SIGINT).name
        self.display.print(
            f"{signal_name}: stopping {', '.join(a.stage.name for a in self.attempts.values()) or 'nothing'}"
        )
        for attempt in self.attempts.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(attempt.process.pid, signal.SIGINT)
        deadline = time.monotonic() + self.options.grace_s
        for attempt in self.attempts.values():
            try:
                attempt.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(attempt.process.pid, signal.SIGKILL)
                attempt.process.wait()
        stopped: dict[str, str] = {}
        for name, attempt in list(self.attempts.items()):
            attempt.reader.join()
            code = attempt.process.returncode
            # A stage that finished just as the signal came keeps its result.
            self.jobs[name] = self._finished(attempt, code, interrupted=None if code == 0 else signal_name)
            if code != 0:
                stopped[attempt.stage.name] = name
        self.attempts.clear()
        self._drain_lines(timeout=0)
        self._refresh()
        self.status = interrupted_status(self.status, stopped, signal_name)
        write_status(self.status_path, self.status)
        self._draw()
        self.display.close()
        return EXIT_INTERRUPTED

    # display

    def views(self) -> list[StageView]:
        running = {a.stage.name: a for a in self.attempts.values()}
        now = time.monotonic()
        views = []
        for status in self.status.stages:
            attempt = running.get(status.name)
            elapsed = None
            if attempt is not None:
                elapsed = now - attempt.started
            elif status.start_time and status.completion_time:
                elapsed = (
                    api.parse_time(status.completion_time) - api.parse_time(status.start_time)
                ).total_seconds()
            views.append(
                StageView(
                    name=status.name,
                    type=status.type,
                    phase=status.phase,
                    attempts=status.attempts,
                    elapsed_s=elapsed,
                    first=attempt.first if attempt else None,
                    latest=attempt.latest if attempt else None,
                    message=status.message
                    if status.phase not in (api.StagePhase.RUNNING, api.StagePhase.SUCCEEDED)
                    else None,
                )
            )
        return views

    def _draw(self) -> None:
        elapsed = format_duration(time.monotonic() - self.started)
        progress = self.status.progress or "0/0"
        title = f"run {self.run.name}: {self.status.phase}, {progress} stages succeeded, {elapsed} elapsed"
        self.display.update(title, self.views())


def result_metrics(status: api.RunStatus) -> dict[str, dict[str, Any]]:
    """Each succeeded stage's scalar metrics, for the closing table (the full set is in status.json)."""
    table: dict[str, dict[str, Any]] = {}
    for stage in status.stages:
        if stage.metrics:
            table[stage.name] = {
                key: value
                for key, value in stage.metrics.items()
                if key not in BOOKKEEPING_KEYS and not isinstance(value, dict | list)
            }
    return table


@contextlib.contextmanager
def _workdir_lock(workdir: Path) -> Iterator[None]:
    """One runner per workdir: two would start the same stages into the same storage."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ManifestError([f"{workdir}: another kubealign run is using this workdir"]) from exc
        yield


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_manifest(path: Path, options: LocalOptions, out: TextIO, err: TextIO) -> int:
    """Validate, plan and run the manifest at ``path``; the exit status of ``kubealign run --local``."""
    try:
        manifest, document = load_manifest(path)
        run = localize(
            api.AlignmentRun.from_manifest(manifest),
            manifest_dir=path.resolve().parent,
            workdir=options.workdir,
        )
        problems = missing_inputs(run, document, path)
        if problems:
            raise ManifestError(problems)
        with _workdir_lock(options.workdir):
            run = with_tracking(run, options.mlflow, options.workdir)
            runner = LocalRunner(run, options, out)
            with _signals(runner.request_stop):
                code = runner.execute()
    except ManifestError as exc:
        for line in exc.errors:
            print(line, file=err)
        return EXIT_INVALID
    status = runner.status
    display = runner.display
    display.print("")
    for line in stage_table(runner.views()):
        display.print(line)
    table = metrics_table(result_metrics(status))
    if table:
        display.print("")
        for line in table:
            display.print(line)
    display.print("")
    display.print(f"status: {runner.status_path}   logs: {options.workdir / 'logs'}")
    elapsed = format_duration(time.monotonic() - runner.started)
    failed = status.condition("Failed")
    if code != EXIT_SUCCEEDED and failed is not None and failed.message:
        display.print(f"run {run.name} {status.phase} after {elapsed}: {failed.message}")
    else:
        display.print(f"run {run.name} {status.phase} in {elapsed}")
    return code


# --- the CLI ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """``kubealign run``: registered by ``kubealign.cli``."""
    parser = subparsers.add_parser(
        "run",
        help="run an AlignmentRun manifest on this machine, without Kubernetes",
        description=(
            "Validate the manifest as the API server would, then run its stages as local processes "
            "(python -m kubealign_jobs.<type>), independent ones side by side, with live progress. "
            "file:// storage goes under the workdir; file://./path inputs are relative to the "
            "manifest. A rerun skips stages whose artifact is complete (delete a stage's folder "
            "under the storage to redo it) and resumes unfinished ones from their checkpoints. "
            "Exit status: 0 succeeded, 1 a stage failed, 2 invalid manifest, 130 interrupted."
        ),
    )
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="an AlignmentRun YAML file")
    parser.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run here (on a cluster, kubectl apply the manifest)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where status, logs and artifacts go (default: runs/<run name>)"
    )
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=default_max_parallel(),
        metavar="N",
        help="stages running at once, each with CPUs/N threads (default: min(2, CPUs) = %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="processes per stage, started under torchrun with gloo: data-parallel, or sharded with "
        "hyperparameters.sharding: fsdp (default: 1)",
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        default=os.environ.get(MLFLOW_ENV) or None,
        help=f"MLflow tracking URI the stages log to, or 'off' (default: ${MLFLOW_ENV}, else "
        f"spec.tracking.mlflow, else sqlite:///WORKDIR/{MLFLOW_DB}, which `mlflow ui "
        "--backend-store-uri` opens)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the stages (default: this one)"
    )
    parser.add_argument(
        "--plain", action="store_true", help="log lines instead of a live display, even on a terminal"
    )
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    if args.max_parallel < 1:
        print("--max-parallel: must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    if args.processes < 1:
        print("--processes: must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    workdir = args.workdir
    if workdir is None:
        try:
            manifest, _ = load_manifest(args.manifest)
        except ManifestError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return EXIT_INVALID
        workdir = Path("runs") / str(manifest["metadata"]["name"])
    options = LocalOptions(
        workdir=workdir.resolve(),
        max_parallel=args.max_parallel,
        python=args.python,
        interactive=sys.stdout.isatty() and not args.plain,
        processes=args.processes,
        mlflow=args.mlflow,
    )
    return run_manifest(args.manifest, options, sys.stdout, sys.stderr)
