"""The arithmetic example's result: held-out accuracy of SFT and of GRPO, over seeds, with intervals.

    python examples/arithmetic/report.py --workdir runs/arithmetic [--check]

Reads ``<workdir>/status.json``: each GRPO member (one per seed) reports ``eval_reward_initial``
(the SFT model's greedy accuracy on the held-out problems: the same model for every seed) and
``eval_reward`` (its own, after training). Prints both and the per-seed gain with the mean and a
95% percentile-bootstrap interval of the mean over seeds (10,000 resamples of the seeds, with
replacement, from a fixed RNG), and writes ``results.json``. ``--check`` exits 1 unless there
are at least 5 seeds; whether GRPO beats SFT is reported, not checked.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIN_SEEDS = 5
RESAMPLES = 10_000


def interval(values: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean and 95% percentile-bootstrap interval of the mean over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(RESAMPLES))
    low, high = means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]
    return {"mean": mean, "ci95": [low, high], "n": len(values)}


def summarize(status: dict[str, Any]) -> dict[str, Any]:
    members = [s for s in status.get("stages", []) if s.get("type") == "grpo"]
    unfinished = [s["name"] for s in members if s.get("phase") != "Succeeded"]
    if not members or unfinished:
        raise SystemExit(f"status.json: GRPO stages not finished: {', '.join(unfinished) or 'none found'}")
    per_seed = [
        {
            "seed": int((s.get("sweep") or {}).get("values", {}).get("seed", 0)),
            "sft": float(s["metrics"]["eval_reward_initial"]),
            "grpo": float(s["metrics"]["eval_reward"]),
        }
        for s in members
    ]
    gains = [row["grpo"] - row["sft"] for row in per_seed]
    return {
        "held_out_problems": int(members[0]["metrics"]["eval_prompts"]),
        "per_seed": per_seed,
        "sft_accuracy": interval([row["sft"] for row in per_seed]),
        "grpo_accuracy": interval([row["grpo"] for row in per_seed]),
        "gain": interval(gains),
        "seeds_improved": sum(g > 0 for g in gains),
        "checks": {"at_least_5_seeds": len(per_seed) >= MIN_SEEDS},
    }


def _format(item: dict[str, Any]) -> str:
    if item["ci95"] is None:
        return f"{item['mean']:.3f}"
    low, high = item["ci95"]
    return f"{item['mean']:.3f} [{low:.3f}, {high:.3f}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/arithmetic"), help="the run's workdir")
    parser.add_argument("--check", action="store_true", help="exit 1 unless there are at least 5 seeds")
    args = parser.parse_args(argv)
    status = json.loads((args.workdir / "status.json").read_text())
    results = summarize(status)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"held-out accuracy on {results['held_out_problems']} problems (greedy answers, exact match)")
    print("| seed | SFT | GRPO | gain |\n|---|---|---|---|")
    for row in results["per_seed"]:
        print(f"| {row['seed']} | {row['sft']:.3f} | {row['grpo']:.3f} | {row['grpo'] - row['sft']:+.3f} |")
    print(
        f"\nSFT {_format(results['sft_accuracy'])}, GRPO {_format(results['grpo_accuracy'])}; "
        f"gain {_format(results['gain'])} (mean, 95% bootstrap interval over {results['gain']['n']} seeds); "
        f"GRPO above SFT in {results['seeds_improved']} of {len(results['per_seed'])} seeds"
    )
    print(f"results: {args.workdir / 'results.json'}")
    return 1 if args.check and not all(results["checks"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
