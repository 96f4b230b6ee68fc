"""The sentiment example's results: a table of reward, KL and win rate per policy, and the frontier plot.

    python examples/sentiment/plot.py --workdir runs/sentiment [--out DIR] [--check]

Reads the evaluate stage's ``results.json`` (found through ``<workdir>/status.json``, so it works
for file:// and s3:// storage alike) and writes into ``--out`` (default: the workdir):

- ``results.json``: per policy and sampling temperature the mean ground-truth reward (VADER), the
  KL to the SFT reference and the win rate against SFT, plus the acceptance checks;
- ``reward_kl_frontier.png``: reward against KL, one point per policy and temperature (SFT, DPO,
  PPO and Best-of-N), drawn by the evaluate stage's own ``plot_frontier``.

The evaluate stage calls its reference policy ``reference``; here that is the SFT model, so it
is shown as ``sft``. ``--check`` exits 1 unless DPO's and PPO's reward exceed SFT's at every
temperature with positive KL: the paper's controlled-sentiment result, in miniature.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REFERENCE = "reference"  # kubealign_jobs.evaluate.REFERENCE, without importing torch for a constant
SFT = "sft"
TRAINED = ("dpo", "ppo")
RESULTS_FILE = "results.json"
PLOT_FILE = "reward_kl_frontier.png"


def evaluate_artifact(workdir: Path) -> str:
    """The artifact URI of the run's evaluate stage, from the runner's status.json."""
    status_path = workdir / "status.json"
    try:
        status = json.loads(status_path.read_text())
    except OSError as exc:
        raise SystemExit(
            f"{status_path}: {exc.strerror}; run the example first (examples/sentiment/run.sh)"
        ) from exc
    for stage in status.get("stages", []):
        if stage.get("type") == "evaluate":
            if stage.get("phase") != "Succeeded":
                raise SystemExit(
                    f"{status_path}: stage {stage['name']} is {stage.get('phase')}, not Succeeded"
                )
            return str(stage["output"])
    raise SystemExit(f"{status_path}: the run has no evaluate stage")


def load_report(artifact: str) -> dict[str, Any]:
    from kubealign_jobs import storage

    report: dict[str, Any] = storage.read_json(storage.join(artifact, RESULTS_FILE))
    return report


def named(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with the reference policy called ``sft``, SFT first."""
    policies = dict(report["policies"])
    renamed = {SFT: policies.pop(REFERENCE), **policies}
    return {**report, "policies": renamed}


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """results.json: every (policy, temperature) cell, Best-of-N, and the acceptance checks."""
    series: dict[str, dict[str, dict[str, float]]] = {
        name: {temperature: dict(cell) for temperature, cell in cells.items()}
        for name, cells in report["policies"].items()
    }
    best = report.get("best_of_n")
    if best:
        series[f"best_of_{best['n']}"] = best["temperatures"]
    temperatures = sorted(series[SFT], key=float)
    checks: dict[str, bool] = {}
    for name in TRAINED:
        if name in series:
            cells = series[name]
            checks[f"{name}_reward_above_sft"] = all(
                cells[t]["reward"] > series[SFT][t]["reward"] for t in temperatures
            )
            checks[f"{name}_kl_positive"] = all(cells[t]["kl"] > 0 for t in temperatures)
    return {
        "judge": report["judge"],
        "prompts": report["prompts"],
        "temperatures": [float(t) for t in temperatures],
        "policies": series,
        "checks": checks,
        "passed": bool(checks) and all(checks.values()) and all(name in series for name in TRAINED),
    }


def table(results: Mapping[str, Any]) -> list[str]:
    """Markdown: one row per policy and temperature."""
    lines = [
        f"| policy | temperature | reward ({results['judge']}) | KL to SFT (nats) | win rate vs SFT |",
        "|---|---|---|---|---|",
    ]
    for name, cells in results["policies"].items():
        for temperature in sorted(cells, key=float):
            cell = cells[temperature]
            lines.append(
                f"| {name} | {float(temperature):.2f} | {cell['reward']:.3f} | {cell['kl']:.2f} | "
                f"{cell['win_rate']:.2f} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/sentiment"), help="the run's workdir")
    parser.add_argument("--out", type=Path, help="where results.json and the plot go (default: the workdir)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless DPO and PPO beat SFT")
    args = parser.parse_args(argv)
    out = args.out or args.workdir
    out.mkdir(parents=True, exist_ok=True)

    report = named(load_report(evaluate_artifact(args.workdir)))
    results = summarize(report)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    # The evaluate stage's own plot, so the example and the stage draw the same figure.
    from kubealign_jobs.evaluate import plot_frontier

    plot_frontier(report, out / PLOT_FILE)

    print("\n".join(table(results)))
    print()
    for check, ok in results["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    print(f"\nresults: {out / RESULTS_FILE}\nplot:    {out / PLOT_FILE}")
    return 1 if args.check and not results["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
