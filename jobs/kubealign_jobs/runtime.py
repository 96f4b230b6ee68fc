"""The stage runner every ``python -m kubealign_jobs.<stage> --config <path or URI>`` goes through.

It reads the stage config, checks whether the stage's artifact already exists (then it exits
0 at once: a retried pod must not redo finished work), validates the hyperparameters against
the stage catalogue (``kubealign_jobs.stages``), starts torch.distributed through accelerate,
runs the stage and reports the result.

Distributed: the operator sets ``MASTER_ADDR``, ``MASTER_PORT``, ``NNODES``, ``NODE_RANK`` and
``NPROC_PER_NODE`` in each pod. Started plainly with a world size above one, the stage
re-launches itself under ``torchrun`` with those values; under torchrun (``LOCAL_RANK`` set)
accelerate wraps the model in DDP, with NCCL on GPUs and gloo on CPUs.

Output contract (what the operator and the local runner read):

- stdout: one JSON object per line, from rank 0 only. Progress records carry
  ``{"stage", "type", "step", "total_steps", "loss", ...metrics}``; other records carry an
  ``"event"`` (``resumed``, ``checkpoint``, ``eval``, ``done``, ``already_complete``, ``error``).
- ``<output>/metrics.json``: the final metrics, written before the artifact's manifest.
- the termination message (``KUBEALIGN_TERMINATION_LOG``, else ``/dev/termination-log`` when
  writable): compact JSON of at most 4 KB, ``{"status": "succeeded" | "failed", ...}``.
- exit codes: 0 success (or already complete), 2 bad config or data, 3 storage failure,
  1 anything else (the traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubealign_jobs import stages, storage, tracking
from kubealign_jobs.config import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_STORAGE,
    METRICS_FILE,
    TERMINATION_MESSAGE_LIMIT,
    TERMINATION_MESSAGE_PATH,
    ConfigError,
    StageConfig,
)

log = logging.getLogger("kubealign_jobs")


class StoppedError(Exception):
    """The stage stopped early on SIGTERM (preemption, a drain, a suspend), after publishing a
    checkpoint of the step it had reached: not a failure; the next pod resumes from there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint published")
        self.step = step


TERMINATION_ENV = "KUBEALIGN_TERMINATION_LOG"
SCRATCH_ENV = "KUBEALIGN_SCRATCH"


# ---------------------------------------------------------------------------- config


def load_config(where: str) -> StageConfig:
    """Read the stage document from a local path or a storage URI."""
    try:
        text = storage.read_text(where)
    except FileNotFoundError as exc:
        raise ConfigError(f"--config: {where} does not exist") from exc
    return StageConfig.from_json(text)


# ---------------------------------------------------------------------------- reporting


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once so a watcher sees progress as it happens."""
    sys.stdout.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def compact_message(record: dict[str, Any], *, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """JSON of ``record`` in at most ``limit`` bytes: long strings are cut, then whole keys dropped.

    The operator parses the termination message, so it must stay valid JSON however large
    the metrics or the error are.
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=_json_default)
    if len(text.encode()) <= limit:
        return text
    trimmed = {
        k: (v[:1000] + "...") if isinstance(v, str) and len(v) > 1000 else v for k, v in record.items()
    }
    priority = ("status", "stage", "error", "exit_code", "artifact", "steps", "loss", "truncated")
    ordered = sorted(trimmed, key=lambda k: (k not in priority, priority.index(k) if k in priority else 0, k))
    kept: dict[str, Any] = {"truncated": True}
    for key in ordered:
        candidate = {**kept, key: trimmed[key]}
        if (
            len(json.dumps(candidate, sort_keys=True, separators=(",", ":"), default=_json_default).encode())
            < limit
        ):
            kept = candidate
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=_json_default)


def write_termination_message(record: dict[str, Any]) -> None:
    """Write the compact result where Kubernetes (or the local runner) picks it up."""
    path = os.environ.get(TERMINATION_ENV) or TERMINATION_MESSAGE_PATH
    target = Path(path)
    if not os.environ.get(TERMINATION_ENV) and not (target.exists() and os.access(target, os.W_OK)):
        return  # outside a pod, and no override: nobody is listening
    try:
        target.write_text(compact_message(record))
    except OSError as exc:
        log.warning("cannot write termination message to %s: %s", target, exc)


# ---------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class StageContext:
    """What a running stage needs besides its hyperparameters."""

    config: StageConfig
    accelerator: Any  # accelerate.Accelerator
    scratch: Path  # this process's local scratch directory
    node_scratch: Path  # shared by the processes of this node: inputs are fetched once per node
    started: float
    tracker: tracking.MlflowTracker | None = None  # rank 0's, where the config names a tracking URI

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def is_local_main(self) -> bool:
        return bool(self.accelerator.is_local_main_process)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def emit(self, record: dict[str, Any]) -> None:
        """A JSON line on stdout from rank 0 (every record is tagged with the stage), and its
        numbers to the tracker at their step."""
        if self.is_main:
            emit({"stage": self.config.stage, "type": self.config.type, **record})
            if self.tracker is not None:
                self.tracker.log_record(record)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def fetch_shared(self, uri: str, name: str, fetch: Callable[[Path], Path] | None = None) -> Path:
        """Fetch ``uri`` (file or prefix) once per node, by the node's first process; all get its path.

        Eight processes of a GPU node would otherwise download (and verify) the same
        multi-gigabyte weights eight times. ``fetch(dest)`` replaces the storage fetch (the hub's).
        """
        dest = self.node_scratch / name
        record = self.node_scratch / f"{name}.path"
        if self.is_local_main:
            path = fetch(dest) if fetch is not None else storage.fetch(uri, dest)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(str(path))
        self.barrier()
        return Path(record.read_text())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world_size == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum of a dict of numbers over all ranks (same keys on every rank)."""
        if self.world_size == 1:
            return dict(values)
        import torch

        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist(), strict=True))


# ---------------------------------------------------------------------------- launching


def _world_from_env(config: StageConfig) -> tuple[int, int]:
    nnodes = int(os.environ.get("NNODES") or config.distributed.nnodes)
    nproc = int(os.environ.get("NPROC_PER_NODE") or config.distributed.nproc_per_node)
    return nnodes, nproc


def _torchrun_command(module: str, argv: list[str], nnodes: int, nproc: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
    ]
    if nnodes == 1 and not os.environ.get("MASTER_ADDR"):
        command.append("--standalone")
    else:
        command += [
            f"--node-rank={os.environ.get('NODE_RANK', '0')}",
            f"--master-addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master-port={os.environ.get('MASTER_PORT', '29500')}",
        ]
    return [*command, "-m", module, *argv]


def resolve_precision(mixed_precision: str) -> str:
    """``auto`` as what it means on this machine: bf16 on GPUs that support it, else no autocast."""
    import torch

    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _make_accelerator(mixed_precision: str) -> Any:
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    mixed_precision = resolve_precision(mixed_precision)
    if cuda:
        # TF32 matmuls: ~2x on Ampere+ at a precision loss far below bf16 autocast's.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPUs even where MPI is installed: torchrun's env:// rendezvous is what we set up.
        backend = "nccl" if cuda else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30)))
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision, kwargs_handlers=handlers)


def _scratch_root() -> Path:
    base = os.environ.get(SCRATCH_ENV)
    return Path(base) if base else Path(tempfile.gettempdir()) / "kubealign"


def _scratch_dir(rank: int) -> Path:
    path = _scratch_root() / f"rank-{rank}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _node_scratch_dir(config: StageConfig) -> Path:
    # torchrun gives all workers of one launch the same run id; a plain process has its own.
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"
    path = _scratch_root() / f"node-{config.run}-{config.stage}-{launch}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Rank 0 speaks for the job; the others only report problems.
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _existing_metrics(config: StageConfig) -> dict[str, Any]:
    try:
        value = storage.read_json(storage.join(config.output, METRICS_FILE))
    except (FileNotFoundError, storage.StorageError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_stage(
    stage_type: str, train: Callable[[StageContext, Any], dict[str, Any]], argv: list[str] | None = None
) -> int:
    """Run one stage end to end and return the process exit code (see the module docstring)."""
    from kubealign_jobs.data import DataError
    from kubealign_jobs.model import ModelError

    # --help documents the stage: what its module says, then its inputs and every hyperparameter.
    module = sys.modules.get(getattr(train, "__module__", ""))
    parser = argparse.ArgumentParser(
        prog=f"python -m kubealign_jobs.{stage_type}",
        description=(module.__doc__ if module and module.__doc__ else "").strip(),
        epilog=stages.describe(stage_type),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="stage config: a local path or an s3:// / file:// URI"
    )
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    rank = int(os.environ.get("RANK", "0"))
    _configure_logging(rank)
    stage = stage_type
    started = time.time()
    try:
        config = load_config(args.config)
        stage = config.stage
        if config.type != stage_type:
            raise ConfigError(f"type: this is the {stage_type!r} trainer, the config is for {config.type!r}")
        hp = stages.parse_hyperparameters(stage_type, config.hyperparameters)
        present = [name for name, value in dataclasses.asdict(config.inputs).items() if value]
        for problem in stages.input_errors(stage_type, present):
            raise ConfigError(problem)
        storage.configure(config.storage)
        if storage.is_complete(config.artifact):
            if rank == 0:
                emit(
                    {
                        "stage": stage,
                        "type": stage_type,
                        "event": "already_complete",
                        "artifact": config.artifact,
                    }
                )
                log.info("%s: artifact %s is already complete; nothing to do", stage, config.artifact)
                metrics = _existing_metrics(config)
                write_termination_message(
                    {"status": "succeeded", "stage": stage, "already_complete": True, **metrics}
                )
            return EXIT_OK
        nnodes, nproc = _world_from_env(config)
        if nnodes * nproc > 1 and "LOCAL_RANK" not in os.environ:
            command = _torchrun_command(f"kubealign_jobs.{stage_type}", args_list, nnodes, nproc)
            log.info("launching %d x %d processes: %s", nnodes, nproc, " ".join(command))
            return _launch(command)

        # Under FSDP, mixed precision is FSDP's own policy (`parallel.shard`), not autocast.
        sharded = getattr(hp, "sharding", "none") == "fsdp"
        accelerator = _make_accelerator("no" if sharded else getattr(hp, "mixed_precision", "auto"))
        from accelerate.utils import set_seed

        set_seed(config.seed)
        ctx = StageContext(
            config=config,
            accelerator=accelerator,
            scratch=_scratch_dir(rank),
            node_scratch=_node_scratch_dir(config),
            started=started,
            tracker=tracking.start(config, is_main=accelerator.is_main_process, started=started),
        )
        try:
            metrics = train(ctx, hp)
            ctx.barrier()
        except BaseException as exc:
            if ctx.tracker is not None:
                ctx.tracker.finish("KILLED" if isinstance(exc, StoppedError) else "FAILED")
            raise
        finally:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
            if ctx.is_local_main:
                shutil.rmtree(ctx.node_scratch, ignore_errors=True)
        if ctx.is_main:
            result = {"status": "succeeded", "stage": stage, "artifact": config.artifact, **metrics}
            ctx.emit({"event": "done", **metrics, "elapsed_s": round(time.time() - started, 3)})
            write_termination_message(result)
            if ctx.tracker is not None:
                # After the artifact and the termination message: a slow tracker delays nothing.
                steps = metrics.get("steps")
                ctx.tracker.finish("FINISHED", int(steps) if isinstance(steps, int | float) else 0, metrics)
        accelerator.end_training()
        return EXIT_OK
    except StoppedError as stopped:
        log.warning("%s: %s", stage, stopped)
        emit({"stage": stage, "type": stage_type, "event": "stopped", "step": stopped.step})
        write_termination_message({"status": "stopped", "stage": stage, "step": stopped.step})
        return EXIT_STOPPED
    except (ConfigError, DataError, ModelError) as exc:
        return _fail(stage, stage_type, exc, EXIT_BAD_INPUT)
    except storage.StorageError as exc:
        return _fail(stage, stage_type, exc, EXIT_STORAGE)
    except Exception as exc:
        log.exception("%s failed", stage)
        return _fail(stage, stage_type, exc, EXIT_FAILED)


def _launch(command: list[str]) -> int:
    """Run torchrun as a child, passing SIGTERM on: the pod's signal reaches only this process,
    and torchrun hands it to every worker, which checkpoints and stops (see loop.train)."""
    child = subprocess.Popen(command)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_STOPPED if stopping and code != EXIT_OK else code


def _fail(stage: str, stage_type: str, exc: BaseException, code: int) -> int:
    message = f"{type(exc).__name__}: {exc}"
    print(f"error: {stage}: {message}", file=sys.stderr, flush=True)
    emit({"stage": stage, "type": stage_type, "event": "error", "error": message, "exit_code": code})
    write_termination_message({"status": "failed", "stage": stage, "error": message, "exit_code": code})
    return code


def publish_results(
    ctx: StageContext, metrics: dict[str, Any], write: Callable[[Path], object], **metadata: Any
) -> None:
    """The end of every stage: rank 0 writes ``<output>/metrics.json``, then the artifact.

    Metrics go first so a finished stage always has them; the artifact folder is written with
    ``write(dest)`` and published manifest last. The manifest's metadata names the stage and its
    type, plus ``metadata`` (e.g. ``steps``).
    """
    if ctx.is_main:
        storage.write_json(storage.join(ctx.config.output, METRICS_FILE), metrics)
        local = ctx.scratch / "artifact"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        write(local)
        stamp = {"stage": ctx.config.stage, "type": ctx.config.type, **metadata}
        storage.publish_dir(local, ctx.config.artifact, metadata=stamp)
        log.info("published %s", ctx.config.artifact)
    ctx.barrier()
