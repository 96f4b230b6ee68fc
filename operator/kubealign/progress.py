"""Terminal progress for the local runner: progress bars, the stage table and the metrics table.

Pure formatting plus one small writer. The trainer prints one JSON object per log step on
stdout (``{"stage", "step", "total_steps", "loss", ...}``); `parse_record` and
`Progress.from_record` turn such a line into a `Progress`, and everything else here turns
snapshots into text. On a terminal the display redraws in place; otherwise (CI logs, tests,
pipes) it prints a line per stage transition and a progress line per stage at most every
``log_interval_s`` seconds, so a log file stays readable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

BAR_WIDTH = 24
# What a progress line shows beside the step: the first of these a trainer reports. PPO has no
# single loss; its mean score is what a watcher wants to see climb.
HEADLINE_METRICS = ("loss", "score", "reward")


@dataclass(frozen=True)
class Progress:
    """One training log line of a stage: where it is and how it is doing."""

    step: int
    total_steps: int | None
    metric: str | None  # which of HEADLINE_METRICS ``value`` is
    value: float | None
    at: float  # time.monotonic() when the line was read

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, at: float) -> Progress:
        """From a trainer's log record; fields of the wrong type count as absent."""
        step, total = record.get("step"), record.get("total_steps")
        metric = next((name for name in HEADLINE_METRICS if _is_number(record.get(name))), None)
        return cls(
            step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
            total_steps=total
            if isinstance(total, int) and not isinstance(total, bool) and total > 0
            else None,
            metric=metric,
            value=float(record[metric]) if metric else None,
            at=at,
        )


@dataclass(frozen=True)
class StageView:
    """What the display shows of one stage."""

    name: str
    type: str
    phase: str
    attempts: int
    elapsed_s: float | None
    first: Progress | None  # the first log line of the current attempt, for the ETA
    latest: Progress | None
    message: str | None = None


def parse_record(line: str) -> dict[str, Any] | None:
    """The JSON object a trainer printed on one stdout line, or None for any other line."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def eta_seconds(first: Progress, latest: Progress) -> float | None:
    """Seconds left at the rate seen since the attempt's first log line (a resumed attempt
    starts at its checkpoint's step, so its rate is measured from there, not from zero)."""
    if latest.total_steps is None or latest.step <= first.step or latest.at <= first.at:
        return None
    rate = (latest.step - first.step) / (latest.at - first.at)
    return max(0.0, (latest.total_steps - latest.step) / rate)


def format_duration(seconds: float | None) -> str:
    """``mm:ss`` (or ``h:mm:ss``); ``--:--`` when unknown."""
    if seconds is None or math.isnan(seconds):
        return "--:--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(view: StageView, *, name_width: int) -> str:
    """``sft       [#######-----]  45%   90/200  loss 2.3140  ETA 00:14`` for a running stage."""
    latest = view.latest
    if latest is None:
        return f"{view.name:<{name_width}}  starting (attempt {view.attempts})"
    loss = f"{latest.metric} {latest.value:.4f}" if latest.metric is not None else ""
    if latest.total_steps is None:
        return f"{view.name:<{name_width}}  step {latest.step}  {loss}".rstrip()
    fraction = latest.step / latest.total_steps
    eta = eta_seconds(view.first, latest) if view.first is not None else None
    steps = f"{latest.step}/{latest.total_steps}"
    return (
        f"{view.name:<{name_width}}  {format_bar(fraction)} {fraction:4.0%} {steps:>11}  "
        f"{loss:<12}  ETA {format_duration(eta)}"
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def stage_table(views: Sequence[StageView]) -> list[str]:
    rows = [
        (
            view.name,
            view.type,
            view.phase,
            str(view.attempts),
            format_duration(view.elapsed_s) if view.elapsed_s is not None else "",
            view.message or "",
        )
        for view in views
    ]
    return format_table(("STAGE", "TYPE", "PHASE", "ATTEMPTS", "TIME", "MESSAGE"), rows)


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, sort_keys=True)


def metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per (stage, metric); the stage name is printed on its first row only."""
    rows: list[tuple[str, str, str]] = []
    for stage, values in metrics.items():
        for index, (key, value) in enumerate(sorted(values.items())):
            rows.append((stage if index == 0 else "", key, format_value(value)))
    return format_table(("STAGE", "METRIC", "VALUE"), rows) if rows else []


class Display:
    """Writes the live view: redrawn in place on a terminal, as log lines elsewhere."""

    def __init__(self, out: TextIO, *, interactive: bool, log_interval_s: float = 10.0) -> None:
        self._out = out
        self._interactive = interactive
        self._log_interval_s = log_interval_s
        self._drawn_lines = 0
        self._phases: dict[str, str] = {}
        self._last_logged: dict[str, float] = {}

    def update(self, title: str, views: Sequence[StageView]) -> None:
        if self._interactive:
            self._redraw(title, views)
        else:
            self._log(views)

    def print(self, line: str = "") -> None:
        """A line that stays above the live view (the view is redrawn below it next time)."""
        self._clear()
        self._out.write(line + "\n")
        self._out.flush()

    def close(self) -> None:
        """Take the live view off the screen: the closing tables that follow replace it."""
        self._clear()

    def _clear(self) -> None:
        if self._interactive and self._drawn_lines:
            # Cursor up to the first line of the view, then clear to the end of the screen.
            self._out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _redraw(self, title: str, views: Sequence[StageView]) -> None:
        name_width = max((len(view.name) for view in views), default=0)
        lines = [title, *stage_table(views)]
        running = [view for view in views if view.phase == "Running"]
        if running:
            lines.append("")
            lines.extend(progress_line(view, name_width=name_width) for view in running)
        self._clear()
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()
        self._drawn_lines = len(lines)

    def _log(self, views: Sequence[StageView]) -> None:
        now = time.monotonic()
        name_width = max((len(view.name) for view in views), default=0)
        for view in views:
            if self._phases.get(view.name) != view.phase:
                self._phases[view.name] = view.phase
                detail = f" ({view.message})" if view.message else ""
                took = (
                    f" after {format_duration(view.elapsed_s)}"
                    if view.phase in ("Succeeded", "Failed")
                    else ""
                )
                self._out.write(f"{view.name}: {view.phase}{took}, attempt {view.attempts}{detail}\n")
                self._last_logged[view.name] = now
            elif (
                view.phase == "Running"
                and view.latest is not None
                and now - self._last_logged.get(view.name, 0.0) >= self._log_interval_s
            ):
                self._out.write(progress_line(view, name_width=name_width) + "\n")
                self._last_logged[view.name] = now
        self._out.flush()
