"""The sentiment example's results: the reward-KL frontier over seeds, with 95% intervals.

    python examples/sentiment/plot.py --workdir runs/sentiment [--out DIR] [--check]

Reads ``<workdir>/status.json`` (the run's status: every stage, sweep members with their values)
and the ``results.json`` of each evaluate stage (one per seed; found through the status, so file://
and s3:// storage both work), and writes into ``--out`` (default: the workdir):

- ``results.json``:
  - ``frontier``: one item per trained policy setting at temperature 1.0 (dpo per beta, ppo per KL
    coefficient, preferred_ft, sft, best_of_n), each with ``method``, ``hyperparameter``,
    ``value``, ``temperature``, ``kl_method``, ``reward_mean``/``reward_ci95``,
    ``kl_mean``/``kl_ci95``, ``win_rate_mean``/``win_rate_ci95`` (against SFT's answers),
    ``proxy_reward_mean``/``proxy_reward_ci95`` (the reward model's score), ``seeds`` and
    ``per_seed`` means;
  - ``temperature_sweep``: the same items at every evaluated temperature;
  - ``reward_model``: its held-out accuracy against the ground-truth labels, per seed;
  - ``overoptimisation``: per PPO setting, how far the learned reward rose over SFT's beside
    how far the true reward did;
  - ``comparison``: where DPO's and PPO's frontiers overlap in KL, whether DPO's lies at or above
    PPO's, on the seed-pooled means and in each seed;
  - ``checks``: the method checks of ``--check``.
- ``reward_kl_frontier.png``: the frontier with interval bands, and reward and win rate against
  temperature.

Intervals are 95% percentile bootstraps over seeds and prompts: each resample draws seeds with
replacement, then prompts with replacement within each drawn seed, and averages. KL is the exact
KL(pi_T || pi_SFT) in nats per answer (``kl_method: exact``); Best-of-N's is the analytic bound
``log N - (N - 1) / N`` (``kl_method: analytic_bound``), drawn apart from the measured frontier.

``--check`` exits 1 unless the method holds: frontier points at temperature 1.0 with the exact
KL, at least 5 seeds, at least 256 prompts per seed, and intervals around every mean. Whether
DPO beats PPO is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = "reference"  # kubealign_jobs.evaluate.REFERENCE, without importing torch for a constant
BEST_OF_N = "best_of_n"
RESULTS_FILE = "results.json"
PLOT_FILE = "reward_kl_frontier.png"
FRONTIER_TEMPERATURE = "1.0"
BOOTSTRAP_RESAMPLES = 2000
MIN_SEEDS = 5
MIN_PROMPTS = 256
SEED = "seed"


@dataclass(frozen=True)
class Point:
    """One policy setting: a method and its swept hyperparameter value (None for fixed ones)."""

    method: str
    hyperparameter: str | None = None
    value: Any = None


def read_status(workdir: Path) -> dict[str, Any]:
    path = workdir / "status.json"
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(
            f"{path}: {exc.strerror}; run the example first (examples/sentiment/run.sh)"
        ) from exc
    return status


def evaluations(status: Mapping[str, Any]) -> dict[int, str]:
    """seed -> the artifact URI of that seed's evaluate stage; every one must have succeeded."""
    found: dict[int, str] = {}
    for stage in status.get("stages", []):
        if stage.get("type") != "evaluate":
            continue
        if stage.get("phase") != "Succeeded":
            raise SystemExit(f"status.json: stage {stage['name']} is {stage.get('phase')}, not Succeeded")
        values = (stage.get("sweep") or {}).get("values", {})
        found[int(values.get(SEED, 0))] = str(stage["output"])
    if not found:
        raise SystemExit("status.json: the run has no evaluate stage")
    return found


def points(status: Mapping[str, Any]) -> dict[str, Point]:
    """Stage (policy) name -> its Point, from the sweep values the status records."""
    out: dict[str, Point] = {}
    for stage in status.get("stages", []):
        sweep = stage.get("sweep") or {"stage": stage["name"], "values": {}}
        method = str(sweep["stage"]).replace("-", "_")
        swept = [(k, v) for k, v in sweep["values"].items() if k != SEED]
        key, value = swept[0] if swept else (None, None)
        out[stage["name"]] = Point(method, key, value)
    return out


def load_report(artifact: str) -> dict[str, Any]:
    from kubealign_jobs import storage

    report: dict[str, Any] = storage.read_json(storage.join(artifact, RESULTS_FILE))
    return report


# ---------------------------------------------------------------------------- statistics


def bootstrap(
    values: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP_RESAMPLES
) -> list[float]:
    """The 95% percentile interval of the mean of ``values`` (seeds, prompts), over seeds and prompts."""
    seeds, prompts = values.shape
    seed_draw = rng.integers(seeds, size=(resamples, seeds))
    prompt_draw = rng.integers(prompts, size=(resamples, seeds, prompts))
    means = values[seed_draw[..., None], prompt_draw].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def wins(rewards: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per answer: 1 if it beats SFT's answer to the same prompt, 1/2 on a tie, else 0."""
    result: np.ndarray = (rewards > baseline) + 0.5 * (rewards == baseline)
    return result


def per_prompt(answers: Sequence[float], samples_per_prompt: int) -> np.ndarray:
    """Answer values averaged within each prompt: the prompt is the unit that is resampled."""
    means: np.ndarray = np.asarray(answers, dtype=float).reshape(-1, samples_per_prompt).mean(axis=1)
    return means


def summarize_point(
    point: Point, temperature: str, by_seed: Mapping[int, Mapping[str, np.ndarray]], kl_method: str, seed: int
) -> dict[str, Any]:
    """One frontier item: means and intervals over seeds and prompts, and each seed's means."""
    rng = np.random.default_rng(seed)
    seeds = sorted(by_seed)
    item: dict[str, Any] = {
        "method": point.method,
        "hyperparameter": point.hyperparameter,
        "value": point.value,
        "temperature": float(temperature),
        "kl_method": kl_method,
        "seeds": seeds,
        "prompts": int(by_seed[seeds[0]]["reward"].shape[0]),
    }
    for quantity in ("reward", "kl", "win_rate", "proxy_reward"):
        if any(quantity not in by_seed[s] for s in seeds):
            continue
        stacked = np.stack([by_seed[s][quantity] for s in seeds])
        item[f"{quantity}_mean"] = float(stacked.mean())
        item[f"{quantity}_ci95"] = bootstrap(stacked, rng)
    item["per_seed"] = [{"seed": s, **{q: float(v.mean()) for q, v in by_seed[s].items()}} for s in seeds]
    return item


def collect(status: Mapping[str, Any], reports: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every (point, temperature) item, from each seed's per-answer values."""
    names = points(status)
    cells: dict[tuple[Point, str, str], dict[int, dict[str, np.ndarray]]] = {}
    for seed, report in reports.items():
        k = int(report["samples_per_prompt"])
        reference = report["per_answer"][REFERENCE]
        series = dict(report["per_answer"])
        if BEST_OF_N in report:
            series[BEST_OF_N] = report[BEST_OF_N]["per_answer"]
        for name, by_temperature in series.items():
            if name == REFERENCE:
                point, kl_method = Point("sft"), report["kl_method"]
            elif name == BEST_OF_N:
                point, kl_method = (
                    Point("best_of_n", "n", report[BEST_OF_N]["n"]),
                    report[BEST_OF_N]["kl_method"],
                )
            else:
                point, kl_method = names[name], report["kl_method"]
            for temperature, values in by_temperature.items():
                rewards = np.asarray(values["reward"], dtype=float)
                baseline = np.asarray(reference[temperature]["reward"], dtype=float)
                quantities = {
                    "reward": per_prompt(values["reward"], k),
                    "kl": per_prompt(values["kl"], k),
                    "win_rate": per_prompt(wins(rewards, baseline).tolist(), k),
                }
                if "reward_model" in values:
                    quantities["proxy_reward"] = per_prompt(values["reward_model"], k)
                cells.setdefault((point, temperature, kl_method), {})[seed] = quantities
    items = [
        summarize_point(point, temperature, by_seed, kl_method, seed=index)
        for index, ((point, temperature, kl_method), by_seed) in enumerate(sorted(cells.items(), key=_order))
    ]
    return items


METHOD_ORDER = ("sft", "preferred_ft", "best_of_n", "dpo", "ppo")


def _order(entry: tuple[tuple[Point, str, str], Any]) -> tuple[Any, ...]:
    (point, temperature, _), _ = entry
    rank = METHOD_ORDER.index(point.method) if point.method in METHOD_ORDER else len(METHOD_ORDER)
    return (float(temperature), rank, point.method, float(point.value or 0))


# ---------------------------------------------------------------------------- comparisons


def _curve(
    items: Sequence[Mapping[str, Any]], reward: str = "reward_mean", kl: str = "kl_mean"
) -> np.ndarray:
    """(kl, reward) points of one method, sorted by KL."""
    pairs = sorted((float(i[kl]), float(i[reward])) for i in items)
    return np.asarray(pairs)


def compare_curves(dpo: np.ndarray, ppo: np.ndarray, grid: int = 50) -> dict[str, Any]:
    """Where the two KL ranges overlap: DPO's reward minus PPO's, by linear interpolation."""
    low = max(dpo[:, 0].min(), ppo[:, 0].min())
    high = min(dpo[:, 0].max(), ppo[:, 0].max())
    if low >= high:
        return {"overlap": None, "dpo_at_or_above": None}
    kls = np.linspace(low, high, grid)
    gap = np.interp(kls, dpo[:, 0], dpo[:, 1]) - np.interp(kls, ppo[:, 0], ppo[:, 1])
    return {
        "overlap": [float(low), float(high)],
        "mean_reward_gap": float(gap.mean()),
        "fraction_dpo_at_or_above": float((gap >= 0).mean()),
        "dpo_at_or_above": bool(gap.mean() >= 0),
    }


def comparison(frontier: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DPO against PPO on the pooled means, then seed by seed."""
    dpo = [i for i in frontier if i["method"] == "dpo"]
    ppo = [i for i in frontier if i["method"] == "ppo"]
    if len(dpo) < 2 or len(ppo) < 2:
        return {"pooled": None, "per_seed": [], "seeds_dpo_at_or_above": None}
    pooled = compare_curves(_curve(dpo), _curve(ppo))
    per_seed = []
    for seed in dpo[0]["seeds"]:

        def at(items: Sequence[Mapping[str, Any]], seed: int = seed) -> np.ndarray:
            rows = [next(r for r in i["per_seed"] if r["seed"] == seed) for i in items]
            return _curve(rows, reward="reward", kl="kl")

        per_seed.append({"seed": seed, **compare_curves(at(dpo), at(ppo))})
    decided = [s for s in per_seed if s["dpo_at_or_above"] is not None]
    return {
        "pooled": pooled,
        "per_seed": per_seed,
        "seeds_compared": len(decided),
        "seeds_dpo_at_or_above": sum(1 for s in decided if s["dpo_at_or_above"]),
    }


def overoptimisation(frontier: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per PPO setting: the rise over SFT of the reward model's score and of the true reward."""
    sft = next((i for i in frontier if i["method"] == "sft"), None)
    if sft is None or "proxy_reward_mean" not in sft:
        return []
    return [
        {
            "value": i["value"],
            "kl_mean": i["kl_mean"],
            "proxy_reward_gain": i["proxy_reward_mean"] - sft["proxy_reward_mean"],
            "true_reward_gain": i["reward_mean"] - sft["reward_mean"],
        }
        for i in frontier
        if i["method"] == "ppo" and "proxy_reward_mean" in i
    ]


def reward_model_accuracy(status: Mapping[str, Any]) -> dict[str, Any]:
    """The reward model's held-out accuracy against the ground-truth (VADER) labels, per seed."""
    per_seed = {}
    for stage in status.get("stages", []):
        if stage.get("type") == "reward" and stage.get("metrics"):
            seed = int(((stage.get("sweep") or {}).get("values") or {}).get(SEED, 0))
            per_seed[seed] = stage["metrics"].get("eval_accuracy")
    values = [v for v in per_seed.values() if v is not None]
    return {
        "held_out_accuracy_per_seed": per_seed,
        "held_out_accuracy_mean": sum(values) / len(values) if values else None,
        "split": "by prompt",
    }


def checks(frontier: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
    """The method, not the outcome."""
    measured = [i for i in frontier if i["method"] != "best_of_n"]
    intervals = all(
        i[f"{q}_ci95"][0] <= i[f"{q}_mean"] <= i[f"{q}_ci95"][1] for i in frontier for q in ("reward", "kl")
    )
    return {
        "frontier_at_temperature_1": bool(frontier) and all(i["temperature"] == 1.0 for i in frontier),
        "exact_kl": bool(measured) and all(i["kl_method"] == "exact" for i in measured),
        "at_least_5_seeds": bool(frontier) and all(len(i["seeds"]) >= MIN_SEEDS for i in frontier),
        "at_least_256_prompts": bool(frontier) and all(i["prompts"] >= MIN_PROMPTS for i in frontier),
        "intervals_present": bool(frontier) and intervals,
        "both_methods_swept": sum(i["method"] == "dpo" for i in frontier) >= 4
        and sum(i["method"] == "ppo" for i in frontier) >= 4,
    }


def summarize(status: Mapping[str, Any], reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    items = collect(status, reports)
    frontier = [i for i in items if i["temperature"] == float(FRONTIER_TEMPERATURE)]
    method_checks = checks(frontier)
    first = reports[min(reports)]
    return {
        "judge": first["judge"],
        "prompts": first["prompts"],
        "samples_per_prompt": first["samples_per_prompt"],
        "seeds": sorted(reports),
        "frontier": frontier,
        "temperature_sweep": items,
        "reward_model": reward_model_accuracy(status),
        "overoptimisation": overoptimisation(frontier),
        "comparison": comparison(frontier),
        "checks": method_checks,
        "passed": all(method_checks.values()),
    }


# ---------------------------------------------------------------------------- output


def label(item: Mapping[str, Any]) -> str:
    if item["hyperparameter"] is None:
        return str(item["method"])
    return f"{item['method']} {item['hyperparameter']}={item['value']}"


def _interval(item: Mapping[str, Any], quantity: str, digits: int) -> str:
    if f"{quantity}_mean" not in item:
        return "-"
    low, high = item[f"{quantity}_ci95"]
    return f"{item[f'{quantity}_mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(results: Mapping[str, Any]) -> list[str]:
    """Markdown: the frontier at temperature 1.0, one row per policy setting."""
    lines = [
        f"| policy | reward ({results['judge']}) | KL to SFT (nats) | KL | win rate vs SFT | "
        "reward model's score |",
        "|---|---|---|---|---|---|",
    ]
    for item in results["frontier"]:
        kl_method = "analytic bound" if item["kl_method"] == "analytic_bound" else "exact"
        lines.append(
            f"| {label(item)} | {_interval(item, 'reward', 3)} | {_interval(item, 'kl', 2)} | {kl_method} | "
            f"{_interval(item, 'win_rate', 2)} | {_interval(item, 'proxy_reward', 2)} |"
        )
    return lines


COLOURS = {
    "sft": "black",
    "preferred_ft": "tab:green",
    "best_of_n": "tab:purple",
    "dpo": "tab:blue",
    "ppo": "tab:orange",
}


SWEEP_COLOURMAPS = {"dpo": "Blues", "ppo": "Oranges"}


def shade(method: str, value: Any, items: Sequence[Mapping[str, Any]]) -> Any:
    """A swept method's colour, darker for larger values of its hyperparameter; else its own."""
    if method not in SWEEP_COLOURMAPS:
        return COLOURS.get(method, "grey")
    from matplotlib import colormaps

    values = sorted({i["value"] for i in items if i["method"] == method})
    return colormaps[SWEEP_COLOURMAPS[method]](0.4 + 0.6 * values.index(value) / max(len(values) - 1, 1))


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Frontier with interval bands (T = 1); reward and win rate against temperature."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (frontier_axis, reward_axis, win_axis) = plt.subplots(1, 3, figsize=(17, 5))
    frontier = results["frontier"]
    for method in ("dpo", "ppo"):
        items = sorted((i for i in frontier if i["method"] == method), key=lambda i: i["kl_mean"])
        if not items:
            continue
        kl = [i["kl_mean"] for i in items]
        colour = COLOURS[method]
        frontier_axis.plot(
            kl,
            [i["reward_mean"] for i in items],
            "o-",
            color=colour,
            label=f"{method} ({items[0]['hyperparameter']} sweep)",
        )
        frontier_axis.fill_between(
            kl,
            [i["reward_ci95"][0] for i in items],
            [i["reward_ci95"][1] for i in items],
            color=colour,
            alpha=0.2,
        )
        frontier_axis.errorbar(
            kl,
            [i["reward_mean"] for i in items],
            xerr=[
                [i["kl_mean"] - i["kl_ci95"][0] for i in items],
                [i["kl_ci95"][1] - i["kl_mean"] for i in items],
            ],
            fmt="none",
            color=colour,
            alpha=0.6,
        )
        for i in items:
            frontier_axis.annotate(
                f"{i['value']}",
                (i["kl_mean"], i["reward_mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    for method in ("sft", "preferred_ft"):
        for i in (i for i in frontier if i["method"] == method):
            frontier_axis.errorbar(
                [i["kl_mean"]],
                [i["reward_mean"]],
                xerr=[[i["kl_mean"] - i["kl_ci95"][0]], [i["kl_ci95"][1] - i["kl_mean"]]],
                yerr=[[i["reward_mean"] - i["reward_ci95"][0]], [i["reward_ci95"][1] - i["reward_mean"]]],
                fmt="s",
                color=COLOURS[method],
                label=method,
            )
    for i in (i for i in frontier if i["method"] == "best_of_n"):
        # Not on the KL axis: its KL is an analytic bound, not a measurement like the others'.
        frontier_axis.axhline(
            i["reward_mean"],
            color=COLOURS["best_of_n"],
            linestyle="--",
            label=f"best of {i['value']}: reward (KL not measured; bound {i['kl_mean']:.2f})",
        )
        frontier_axis.axhspan(*i["reward_ci95"], color=COLOURS["best_of_n"], alpha=0.1)
    seeds = len(results["seeds"])
    frontier_axis.set(
        xlabel="exact KL(π ‖ π_SFT) per answer at T = 1, nats",
        ylabel=f"mean reward ({results['judge']})",
        title=f"Reward-KL frontier at T = 1 ({seeds} seeds, 95% CI)",
    )
    frontier_axis.legend(fontsize=7, loc="lower right")

    sweep = results["temperature_sweep"]
    for point in dict.fromkeys((i["method"], i["value"]) for i in sweep):
        items = sorted(
            (i for i in sweep if (i["method"], i["value"]) == point), key=lambda i: i["temperature"]
        )
        temperatures = [i["temperature"] for i in items]
        colour = shade(point[0], point[1], sweep)
        for axis, quantity in ((reward_axis, "reward"), (win_axis, "win_rate")):
            axis.plot(
                temperatures,
                [i[f"{quantity}_mean"] for i in items],
                "o-",
                color=colour,
                alpha=0.85,
                label=label(items[0]),
            )
            axis.fill_between(
                temperatures,
                [i[f"{quantity}_ci95"][0] for i in items],
                [i[f"{quantity}_ci95"][1] for i in items],
                color=colour,
                alpha=0.08,
            )
    reward_axis.set(
        xlabel="sampling temperature",
        ylabel=f"mean reward ({results['judge']})",
        title="Reward against temperature",
    )
    win_axis.set(
        xlabel="sampling temperature",
        ylabel="win rate against SFT's answer at the same temperature",
        title="Win rate against temperature",
        ylim=(0, 1),
    )
    win_axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/sentiment"), help="the run's workdir")
    parser.add_argument("--out", type=Path, help="where results.json and the plot go (default: the workdir)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the method checks hold")
    args = parser.parse_args(argv)
    out = args.out or args.workdir
    out.mkdir(parents=True, exist_ok=True)

    status = read_status(args.workdir)
    reports = {seed: load_report(uri) for seed, uri in evaluations(status).items()}
    results = summarize(status, reports)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plot(results, out / PLOT_FILE)

    print("\n".join(table(results)))
    print()
    compared = results["comparison"]
    pooled = compared["pooled"]
    if pooled and pooled["overlap"]:
        low, high = pooled["overlap"]
        where = "at or above" if pooled["dpo_at_or_above"] else "below"
        print(
            f"DPO's frontier lies {where} PPO's over their shared KL range {low:.2f}-{high:.2f} nats "
            f"(mean reward gap {pooled['mean_reward_gap']:+.3f}); at or above in "
            f"{compared['seeds_dpo_at_or_above']} of {compared['seeds_compared']} seeds."
        )
    else:
        print("DPO's and PPO's frontiers do not overlap in KL: no comparison at equal KL.")
    accuracy = results["reward_model"]["held_out_accuracy_mean"]
    if accuracy is not None:
        print(
            f"reward model: held-out accuracy {accuracy:.3f} against the ground-truth labels "
            "(split by prompt)"
        )
    for row in results["overoptimisation"]:
        print(
            f"ppo init_kl_coef={row['value']}: reward model score +{row['proxy_reward_gain']:.2f} over SFT, "
            f"true reward {row['true_reward_gain']:+.3f}"
        )
    print()
    for check, ok in results["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    print(f"\nresults: {out / RESULTS_FILE}\nplot:    {out / PLOT_FILE}")
    return 1 if args.check and not results["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
