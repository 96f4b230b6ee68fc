"""Evaluate stage: reward, win rate and KL of each policy over a temperature sweep, plus Best-of-N.

The DPO paper's evaluation: every policy (``inputs.policies``, name -> artifact) and the
reference (``inputs.reference``, else ``inputs.model``; reported as ``reference``) answers the
same eval prompts (``inputs.eval_data``, else ``inputs.data``) at each sampling temperature.

- reward: the mean score of the judge, a ground-truth scorer (``hyperparameters.scorer``,
  e.g. ``vader``) or else the reward model (``inputs.reward_model``). With both, the reward
  model's mean is reported as ``reward_model`` beside the scorer's ``reward``.
- win_rate: the fraction of prompts where the policy's answer outscores the baseline's answer,
  ties counting 1/2. The baseline is the reference's answer at the same temperature
  (``baseline: reference``), or the dataset's own answer to the prompt (``baseline: data``:
  ``chosen``, ``completion`` or ``output`` of each eval row), as the paper compares summaries
  with the human-written ones.
- kl: mean over the policy's own samples of ``sum_t log pi(y_t) - log pi_ref(y_t)``, both at
  temperature 1: the Monte Carlo estimate of KL(pi || pi_ref) at temperature 1, and the
  models' log-ratio on the sampled answers at other temperatures.
- Best-of-N: N answers from the reference, the best kept by the reward model (else the
  scorer); its KL is the analytic ``log N - (N - 1) / N``.

    python -m kubealign_jobs.evaluate --config stage.json

Artifact: ``results.json`` shaped for a reward-KL frontier plot, and ``frontier.png``::

    {"policies": {name: {temperature: {"reward", "kl", "win_rate", "n"}}},
     "answers": {name: {temperature: [{"prompt", "answer", "score"}, ...]}},  # show_answers each
     "best_of_n": {"n": N, "selector": ..., "kl": ..., "temperatures": {temperature: {...}}},
     "judge": ..., "baseline": "reference" | "data", "prompts": ...}

Each finished policy's results are checkpointed, so a restarted stage evaluates only the rest;
the reference is sampled from fixed seeds, so the win rates of a resumed run are unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubealign_jobs import data, loop, rl, runtime, scorers, storage
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.config import ConfigError, derive_seed
from kubealign_jobs.runtime import StageContext
from kubealign_jobs.sampling import Samples, SamplingParams, completion_logps, sample
from kubealign_jobs.stages import EvaluateHyperparameters as Hyperparameters

REFERENCE = "reference"
BEST_OF_N = "best_of_n"
RESULTS_FILE = "results.json"
PLOT_FILE = "frontier.png"
UNIT_FILE = "unit.json"


def temperature_key(temperature: float) -> str:
    """JSON object keys are strings: ``0.25``, ``1.0``."""
    return repr(float(temperature))


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of pairs where ``scores`` beats ``baseline``, ties counting 1/2."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win_rate: {len(scores)} scores against {len(baseline)} baseline scores")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) = log N - (N - 1) / N (Stiennon et al. 2020, appendix)."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judges:
    """The judge (reward, win rate), the reward model if any, and the Best-of-N selector."""

    judge: scorers.Scorer
    reward_model: scorers.Scorer | None

    @property
    def selector(self) -> scorers.Scorer:
        return self.reward_model or self.judge

    def score(self, samples: Samples) -> dict[str, list[float]]:
        """Per-answer scores: ``judge`` always; ``reward_model`` when it is not the judge."""
        out = {"judge": self.judge.score(samples.prompts, samples.completions)}
        if self.reward_model is not None and self.reward_model is not self.judge:
            out["reward_model"] = self.reward_model.score(samples.prompts, samples.completions)
        return out


def _judges(ctx: StageContext, hp: Hyperparameters) -> Judges:
    """The judge is the ground truth when there is one (the scorer), else the reward model."""
    reward, ground_truth = scorers.reward_sources(
        ctx.config.inputs.reward_model,
        hp,
        ctx.scratch,
        device=ctx.device,
        batch_size=hp.batch_size,
        stage="evaluate",
    )
    if ground_truth is not None:
        return Judges(judge=ground_truth, reward_model=reward)
    return Judges(judge=reward, reward_model=reward if ctx.config.inputs.reward_model else None)


# ---------------------------------------------------------------------------- one unit of work


@dataclass(frozen=True)
class Sums:
    """This rank's sums for one (policy, temperature) cell; added across ranks before dividing."""

    n: float
    reward: float
    wins: float
    kl: float
    reward_model: float

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1.0)
        out = {"reward": self.reward / n, "win_rate": self.wins / n, "kl": self.kl / n, "n": self.n}
        if not math.isnan(self.reward_model):
            out["reward_model"] = self.reward_model / n
        return out


def _sums(scores: dict[str, list[float]], baseline: list[float], kl: list[float]) -> Sums:
    judge = scores["judge"]
    wins = win_rate(judge, baseline) * len(judge) if judge else 0.0
    return Sums(
        n=float(len(judge)),
        reward=sum(judge),
        wins=wins,
        kl=sum(kl),
        reward_model=sum(scores["reward_model"]) if "reward_model" in scores else math.nan,
    )


def _reduce(ctx: StageContext, sums: Sums) -> dict[str, float]:
    values = {"n": sums.n, "reward": sums.reward, "wins": sums.wins, "kl": sums.kl}
    if not math.isnan(sums.reward_model):
        values["reward_model"] = sums.reward_model
    total = ctx.sum_across_ranks(values)
    return Sums(
        n=total["n"],
        reward=total["reward"],
        wins=total["wins"],
        kl=total["kl"],
        reward_model=total.get("reward_model", math.nan),
    ).metrics()


def _sample(
    hp: Hyperparameters, model: Any, tokenizer: Any, prompts: list[str], temperature: float
) -> Samples:
    """``model``'s answers to ``prompts`` at ``temperature``, with the stage's batch and prompt limits."""
    return sample(
        model,
        tokenizer,
        prompts,
        SamplingParams(max_new_tokens=hp.max_new_tokens, temperature=temperature, top_p=hp.top_p),
        batch_size=hp.batch_size,
        max_prompt_tokens=hp.max_prompt_tokens,
    )


Answers = dict[str, list[dict[str, Any]]]  # temperature -> the first few (prompt, answer, score)


def shown_answers(hp: Hyperparameters, samples: Samples, judge_scores: list[float]) -> list[dict[str, Any]]:
    """The first ``show_answers`` answers, to read beside the numbers (a reward can be gamed)."""
    return [
        {"prompt": prompt, "answer": answer, "score": score}
        for prompt, answer, score in list(
            zip(samples.prompts, samples.completions, judge_scores, strict=True)
        )[: hp.show_answers]
    ]


def evaluate_reference(
    ctx: StageContext,
    hp: Hyperparameters,
    *,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    data_baseline: list[float] | None,
) -> tuple[dict[str, Any], dict[str, list[float]], Answers]:
    """The reference's cells and Best-of-N's, the baseline judge scores per temperature (this
    rank), and the reference's first answers.

    The baseline is ``data_baseline`` (the dataset's answers) when given, else the reference's
    own answers at each temperature.
    """
    cells: dict[str, Any] = {}
    baselines: dict[str, list[float]] = {}
    best: dict[str, Any] = {}
    answers: Answers = {}
    for t_index, temperature in enumerate(hp.temperatures):
        key = temperature_key(temperature)
        torch.manual_seed(derive_seed(ctx.config.seed, 0, t_index, ctx.rank))
        samples = _sample(hp, reference, tokenizer, prompts, temperature)
        scores = judges.score(samples)
        # Against itself the reference ties every comparison, by definition; its KL is 0.
        baselines[key] = scores["judge"] if data_baseline is None else data_baseline
        cells[key] = _reduce(ctx, _sums(scores, baselines[key], [0.0] * len(samples)))
        answers[key] = shown_answers(hp, samples, scores["judge"])
        if hp.best_of_n:
            best[key] = _reduce(
                ctx,
                _best_of_n(
                    hp,
                    reference=reference,
                    tokenizer=tokenizer,
                    prompts=prompts,
                    judges=judges,
                    temperature=temperature,
                    baseline=baselines[key],
                ),
            )
    out: dict[str, Any] = {REFERENCE: cells}
    if hp.best_of_n:
        out[BEST_OF_N] = {
            "n": hp.best_of_n,
            "selector": judges.selector.name,
            "kl": best_of_n_kl(hp.best_of_n),
            "temperatures": best,
        }
    return out, baselines, answers


def _best_of_n(
    hp: Hyperparameters,
    *,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    temperature: float,
    baseline: list[float],
) -> Sums:
    n = hp.best_of_n
    repeated = [prompt for prompt in prompts for _ in range(n)]
    samples = _sample(hp, reference, tokenizer, repeated, temperature)
    selection = judges.selector.score(samples.prompts, samples.completions)
    picks = [max(range(i * n, (i + 1) * n), key=lambda j: selection[j]) for i in range(len(prompts))]
    chosen = Samples(
        prompts=[samples.prompts[j] for j in picks],
        completions=[samples.completions[j] for j in picks],
        prompt_ids=samples.prompt_ids[picks],
        prompt_mask=samples.prompt_mask[picks],
        completion_ids=samples.completion_ids[picks],
        completion_mask=samples.completion_mask[picks],
    )
    scores = judges.score(chosen)
    return _sums(scores, baseline, [best_of_n_kl(n)] * len(picks))


def evaluate_policy(
    ctx: StageContext,
    hp: Hyperparameters,
    *,
    unit: int,
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    baselines: dict[str, list[float]],
) -> tuple[dict[str, Any], Answers]:
    """One policy's cells (samples at each temperature, judged, compared, and their KL to the
    reference) and its first answers."""
    cells = {}
    answers: Answers = {}
    for t_index, temperature in enumerate(hp.temperatures):
        key = temperature_key(temperature)
        torch.manual_seed(derive_seed(ctx.config.seed, unit, t_index, ctx.rank))
        samples = _sample(hp, policy, tokenizer, prompts, temperature)
        logps = completion_logps(policy, samples, batch_size=hp.batch_size)
        ref_logps = completion_logps(reference, samples, batch_size=hp.batch_size)
        kl = rl.sequence_kl(logps, ref_logps, samples.completion_mask).tolist()
        scores = judges.score(samples)
        cells[key] = _reduce(ctx, _sums(scores, baselines[key], kl))
        answers[key] = shown_answers(hp, samples, scores["judge"])
    return cells, answers


# ---------------------------------------------------------------------------- the stage


def _unit_uri(checkpoints_uri: str, unit: int) -> str:
    return storage.join(checkpoints_uri, f"unit-{unit:04d}")


def _load_done(ctx: StageContext, names: list[str]) -> dict[int, dict[str, Any]]:
    """Finished units from an earlier attempt (rank 0 reads, everyone gets them)."""
    done: dict[int, dict[str, Any]] = {}
    if ctx.is_main:
        for unit, name in enumerate(names):
            uri = _unit_uri(ctx.config.checkpoints, unit)
            if storage.is_complete(uri):
                doc = storage.read_json(storage.join(uri, UNIT_FILE))
                if doc.get("name") == name:  # a renamed policy list invalidates the old numbering
                    done[unit] = doc
    result: dict[int, dict[str, Any]] = ctx.broadcast(done)
    return result


def _save_unit(ctx: StageContext, unit: int, doc: dict[str, Any]) -> None:
    if ctx.is_main:
        local = ctx.scratch / f"unit-{unit}"
        local.mkdir(parents=True, exist_ok=True)
        (local / UNIT_FILE).write_text(json.dumps(doc))
        storage.publish_dir(local, _unit_uri(ctx.config.checkpoints, unit), metadata={"unit": unit})
    ctx.barrier()


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    """The evaluate stage (called by `runtime.run_stage`)."""
    inputs = ctx.config.inputs
    reference_uri = loop.require_input(inputs.reference or inputs.model, "inputs.reference")
    data_uri = loop.require_input(inputs.eval_data or inputs.data, "inputs.eval_data")
    if REFERENCE in inputs.policies:
        raise ConfigError(f"inputs.policies.{REFERENCE}: the name is reserved for the reference policy")
    judges = _judges(ctx, hp)
    rows = data.read_rows(data_uri, ctx.scratch / "data")
    if hp.max_prompts:
        rows = rows[: hp.max_prompts]
    reference_dir = loop.fetch_model(ctx, reference_uri, REFERENCE)
    tokenizer = models.load_tokenizer(reference_dir)
    chat_format = data.tokenizer_chat_format(tokenizer)
    all_prompts = [data.prompt_text(row, chat_format) for row in rows]
    repeated = [prompt for prompt in all_prompts for _ in range(hp.samples_per_prompt)]
    if len(repeated) < ctx.world_size:
        raise data.DataError(f"{data_uri}: {len(repeated)} eval answers for {ctx.world_size} processes")
    prompts = repeated[ctx.rank :: ctx.world_size]
    data_baseline = None
    if hp.baseline == "data":
        given = [reference_answer(row, chat_format) for row in rows for _ in range(hp.samples_per_prompt)]
        data_baseline = judges.judge.score(prompts, given[ctx.rank :: ctx.world_size])
    reference = use_fast_masks(models.load_causal_lm(reference_dir)).to(ctx.device).eval()

    names = [REFERENCE, *sorted(inputs.policies)]
    done = _load_done(ctx, names)
    if done:
        ctx.emit({"event": "resumed", "done": [names[unit] for unit in sorted(done)]})

    answers: dict[str, Answers] = {}
    if 0 in done:
        results = done[0]["results"]
        answers[REFERENCE] = done[0].get("answers", {})
        baselines = {key: scores[ctx.rank :: ctx.world_size] for key, scores in done[0]["baselines"].items()}
    else:
        with ctx.accelerator.autocast():
            results, baselines, answers[REFERENCE] = evaluate_reference(
                ctx,
                hp,
                reference=reference,
                tokenizer=tokenizer,
                prompts=prompts,
                judges=judges,
                data_baseline=data_baseline,
            )
        # Every rank's reference scores, in prompt order, so a resumed run compares against the same answers.
        gathered = ctx.gather(baselines)
        # Global answer i was rank (i mod W)'s answer number i // W.
        world = ctx.world_size
        full = {
            key: [gathered[i % world][key][i // world] for i in range(len(repeated))] for key in baselines
        }
        _save_unit(
            ctx, 0, {"name": REFERENCE, "results": results, "baselines": full, "answers": answers[REFERENCE]}
        )
    ctx.emit({"step": 1, "total_steps": len(names), "policy": REFERENCE, **_headline(results[REFERENCE])})

    policies: dict[str, Any] = {REFERENCE: results[REFERENCE]}
    for unit, name in enumerate(names[1:], start=1):
        if unit in done:
            policies[name] = done[unit]["results"]
            answers[name] = done[unit].get("answers", {})
        else:
            policy_dir = loop.fetch_model(ctx, inputs.policies[name], f"policy-{unit}")
            policy = use_fast_masks(models.load_causal_lm(policy_dir)).to(ctx.device).eval()
            # The same autocast for the policy and the reference: precision alone must not show up as KL.
            with ctx.accelerator.autocast():
                policies[name], answers[name] = evaluate_policy(
                    ctx,
                    hp,
                    unit=unit,
                    policy=policy,
                    reference=reference,
                    tokenizer=tokenizer,
                    prompts=prompts,
                    judges=judges,
                    baselines=baselines,
                )
            del policy
            _save_unit(ctx, unit, {"name": name, "results": policies[name], "answers": answers[name]})
        ctx.emit({"step": unit + 1, "total_steps": len(names), "policy": name, **_headline(policies[name])})

    report: dict[str, Any] = {
        "policies": policies,
        "judge": judges.judge.name,
        "baseline": hp.baseline,
        "prompts": len(all_prompts),
        "samples_per_prompt": hp.samples_per_prompt,
        "answers": answers,
    }
    if BEST_OF_N in results:
        report[BEST_OF_N] = results[BEST_OF_N]

    def write(dest: Path) -> None:
        (dest / RESULTS_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
        if hp.plot:
            plot_frontier(report, dest / PLOT_FILE)

    metrics = _summary(report)
    runtime.publish_results(ctx, report, write)
    return metrics


def reference_answer(row: data.Row, chat_format: data.ChatFormatter = data.default_chat_format) -> str:
    """The dataset's own answer to an eval row: ``chosen``, else the SFT answer (completion/output)."""
    try:
        if "chosen" in row.fields:
            return data.preference_example(row, chat_format).chosen
        return data.sft_example(row, chat_format).completion
    except data.DataError as exc:
        raise data.DataError(f"hyperparameters.baseline=data needs each eval row's answer: {exc}") from exc


def _headline(cells: dict[str, dict[str, float]]) -> dict[str, float]:
    """The highest temperature's numbers, for progress lines."""
    last = cells[max(cells, key=float)]
    return {"reward": last["reward"], "kl": last["kl"], "win_rate": last["win_rate"]}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Compact per-policy figures for the termination message (<= 4 KB): the mean over temperatures."""
    out: dict[str, Any] = {"prompts": report["prompts"], "judge": report["judge"]}
    for name, cells in report["policies"].items():
        for metric in ("reward", "win_rate", "kl"):
            out[f"{name}/{metric}"] = round(sum(c[metric] for c in cells.values()) / len(cells), 5)
    return out


def plot_frontier(report: dict[str, Any], path: Path) -> None:
    """Reward against KL (one point per temperature) and win rate against temperature."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (frontier, wins) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = dict(report["policies"])
    if BEST_OF_N in report:
        series[f"best of {report[BEST_OF_N]['n']}"] = report[BEST_OF_N]["temperatures"]
    for name, cells in series.items():
        keys = sorted(cells, key=float)
        frontier.plot([cells[k]["kl"] for k in keys], [cells[k]["reward"] for k in keys], "o-", label=name)
        wins.plot([float(k) for k in keys], [cells[k]["win_rate"] for k in keys], "o-", label=name)
    frontier.set(xlabel="KL(pi || pi_ref), nats", ylabel=f"reward ({report['judge']})", title="Reward vs KL")
    wins.set(
        xlabel="sampling temperature",
        ylabel=f"win rate vs {report['baseline']}",
        title="Win rate",
        ylim=(0, 1),
    )
    frontier.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    return runtime.run_stage("evaluate", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
