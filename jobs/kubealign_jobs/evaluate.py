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
- kl: KL(pi_T || pi_ref) of the distribution the answers were sampled from (the policy at
  temperature T, with top_p) to the reference at temperature 1, in nats per answer: along each
  sampled answer, the exact per-token KL summed over the whole vocabulary, then summed over
  the answer's tokens (``sampling.completion_kl``); the mean over answers estimates the
  sequence KL without the variance of sampling each token. ``kl_mc`` beside it is the plain
  log-ratio estimate ``sum_t log pi_T(y_t) - log pi_ref(y_t)`` on the same answers. The
  tempered reference is a policy like any other: its KL is 0 only at T = 1.
- judged win rate (``hyperparameters.judge``): a judge model compares each policy's answer with
  the baseline's answer to the same prompt, asked in both orders (``kubealign_jobs.judge``):
  ``judge_win_rate`` with its 95% bootstrap interval over answers (``judge_win_rate_low`` /
  ``_high``), ``judge_wins`` / ``_ties`` / ``_losses`` / ``_unparseable`` / ``_n``, and
  ``judge_lc_win_rate`` with ``length_controlled``. The judge is an OpenAI-compatible chat server
  (``endpoint``, ``model``) or a model loaded here (``model: {uri}``); the reference is judged only
  against the data's answers (against its own it would only tie).
- Best-of-N: N answers from the reference (at each temperature), the best kept by the reward
  model (else the scorer). It has no per-token distribution, so no KL is measured: ``kl`` is
  the analytic bound ``log N - (N - 1) / N`` on its KL to the distribution it draws from (the
  reference itself only at T = 1), ``kl_method: analytic_bound``, to be plotted apart.

    python -m kubealign_jobs.evaluate --config stage.json

Artifact: ``results.json`` shaped for a reward-KL frontier plot, and ``frontier.png``::

    {"policies": {name: {temperature: {"reward", "kl", "kl_mc", "win_rate", "n", "reward_model"?}}},
     "per_answer": {name: {temperature: {"reward": [...], "kl": [...], "kl_mc": [...], ...}}},
     "answers": {name: {temperature: [{"prompt", "answer", "score"}, ...]}},  # show_answers each
     "best_of_n": {"n": N, "selector": ..., "kl": ..., "kl_method": "analytic_bound",
                   "temperatures": {temperature: {...}}, "per_answer": {...}},
     "kl_method": "exact", "judge": ..., "pairwise_judge": {...} | null,
     "baseline": "reference" | "data", "prompts": ...,
     "samples_per_prompt": ...}

``per_answer`` lists are in answer order: answer i answers prompt ``i // samples_per_prompt``,
so intervals can be bootstrapped over prompts (``reward_model`` is the reward model's score
when it is not the judge: the learned reward beside the true one).

Each finished policy's results are checkpointed, so a restarted stage evaluates only the rest;
the reference is sampled from fixed seeds, so the win rates of a resumed run are unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from kubealign_jobs import data, loop, runtime, scorers, storage
from kubealign_jobs import judge as judging
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.config import JUDGE_API_KEY_ENV, ConfigError, derive_seed
from kubealign_jobs.runtime import StageContext
from kubealign_jobs.sampling import Samples, SamplingParams, completion_kl, sample
from kubealign_jobs.stages import EvaluateHyperparameters as Hyperparameters

T = TypeVar("T")
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
    """``log N - (N - 1) / N``: the usual closed form for KL(pi_BoN || pi_ref) (Stiennon et al. 2020),
    which is exact only without ties and in fact an upper bound on it (Beirami et al. 2024)."""
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

# Per-answer values of one (policy, temperature) cell, in global answer order (answer i is
# prompt i // samples_per_prompt): what results.json keeps for intervals over prompts and seeds.
PerAnswer = dict[str, list[float]]


def in_global_order(ctx: StageContext, values: dict[str, list[T]]) -> dict[str, list[T]]:
    """Every rank's lists joined in global answer order: answer i was rank (i mod W)'s number i // W."""
    gathered = ctx.gather(values)
    world = ctx.world_size
    total = sum(len(part[next(iter(values))]) for part in gathered) if values else 0
    return {key: [gathered[i % world][key][i // world] for i in range(total)] for key in values}


def cell_metrics(per_answer: PerAnswer, baseline: list[float]) -> dict[str, float]:
    """The means of one cell, its win rate against ``baseline`` (same order) and its size."""
    n = len(per_answer["reward"])
    out = {key: sum(values) / max(n, 1) for key, values in per_answer.items()}
    out["win_rate"] = win_rate(per_answer["reward"], baseline)
    out["n"] = float(n)
    return out


def _per_answer(ctx: StageContext, scores: dict[str, list[float]], kl: PerAnswer) -> PerAnswer:
    """A cell's per-answer values in global order: the judge's reward, the KL figures, and the
    reward model's score when it is not the judge."""
    values = {"reward": scores["judge"], **kl}
    if "reward_model" in scores:
        values["reward_model"] = scores["reward_model"]
    return in_global_order(ctx, values)


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


def _sampled_cell(
    ctx: StageContext,
    hp: Hyperparameters,
    *,
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    temperature: float,
    seed: int,
) -> tuple[PerAnswer, list[dict[str, Any]], list[str]]:
    """``policy``'s answers at ``temperature``, judged, with their exact KL to ``reference``: the
    per-answer values, this rank's first answers to show, and every answer (global order)."""
    torch.manual_seed(seed)
    samples = _sample(hp, policy, tokenizer, prompts, temperature)
    scores = judges.score(samples)
    exact, monte_carlo = completion_kl(
        policy, reference, samples, temperature=temperature, top_p=hp.top_p, batch_size=hp.batch_size
    )
    values = _per_answer(ctx, scores, {"kl": exact.tolist(), "kl_mc": monte_carlo.tolist()})
    texts = in_global_order(ctx, {"answers": samples.completions})["answers"]
    return values, shown_answers(hp, samples, scores["judge"]), texts


Answers = dict[str, list[dict[str, Any]]]  # temperature -> the first few (prompt, answer, score)


def shown_answers(hp: Hyperparameters, samples: Samples, judge_scores: list[float]) -> list[dict[str, Any]]:
    """The first ``show_answers`` answers, to read beside the numbers (a reward can be gamed)."""
    return [
        {"prompt": prompt, "answer": answer, "score": score}
        for prompt, answer, score in list(
            zip(samples.prompts, samples.completions, judge_scores, strict=True)
        )[: hp.show_answers]
    ]


@dataclass
class Unit:
    """One policy's (or the reference's) results: cells and per-answer values per temperature."""

    cells: dict[str, dict[str, float]]
    per_answer: dict[str, PerAnswer]
    answers: Answers
    texts: dict[str, list[str]] = field(default_factory=dict)  # every answer, for the judge (not saved)


def evaluate_reference(
    ctx: StageContext,
    hp: Hyperparameters,
    *,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    data_baseline: list[float] | None,
) -> tuple[Unit, dict[str, Any] | None, dict[str, list[float]]]:
    """The reference's unit, Best-of-N's report (None when off) and the baseline judge scores
    per temperature (global answer order).

    The baseline is ``data_baseline`` (the dataset's answers) when given, else the reference's
    own answers at each temperature. The tempered reference is a policy of its own: its KL to
    the reference is 0 only at temperature 1.
    """
    unit = Unit({}, {}, {})
    baselines: dict[str, list[float]] = {}
    best: dict[str, Any] = {}
    best_answers: dict[str, PerAnswer] = {}
    for t_index, temperature in enumerate(hp.temperatures):
        key = temperature_key(temperature)
        values, unit.answers[key], unit.texts[key] = _sampled_cell(
            ctx,
            hp,
            policy=reference,
            reference=reference,
            tokenizer=tokenizer,
            prompts=prompts,
            judges=judges,
            temperature=temperature,
            seed=derive_seed(ctx.config.seed, 0, t_index, ctx.rank),
        )
        # Against its own answers the reference ties every comparison, by definition.
        baselines[key] = values["reward"] if data_baseline is None else data_baseline
        unit.cells[key] = cell_metrics(values, baselines[key])
        unit.per_answer[key] = values
        if hp.best_of_n:
            best_answers[key] = _best_of_n(
                ctx,
                hp,
                reference=reference,
                tokenizer=tokenizer,
                prompts=prompts,
                judges=judges,
                temperature=temperature,
            )
            best[key] = cell_metrics(best_answers[key], baselines[key])
    report = None
    if hp.best_of_n:
        report = {
            "n": hp.best_of_n,
            "selector": judges.selector.name,
            # Not a measured divergence: the Best-of-N policy has no per-token distribution.
            "kl": best_of_n_kl(hp.best_of_n),
            "kl_method": "analytic_bound",
            "temperatures": best,
            "per_answer": best_answers,
        }
    return unit, report, baselines


def _best_of_n(
    ctx: StageContext,
    hp: Hyperparameters,
    *,
    reference: Any,
    tokenizer: Any,
    prompts: list[str],
    judges: Judges,
    temperature: float,
) -> PerAnswer:
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
    return _per_answer(ctx, scores, {"kl": [best_of_n_kl(n)] * len(picks)})


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
) -> Unit:
    """One policy's cells: samples at each temperature, judged, compared, and their exact KL to
    the reference."""
    result = Unit({}, {}, {})
    for t_index, temperature in enumerate(hp.temperatures):
        key = temperature_key(temperature)
        values, result.answers[key], result.texts[key] = _sampled_cell(
            ctx,
            hp,
            policy=policy,
            reference=reference,
            tokenizer=tokenizer,
            prompts=prompts,
            judges=judges,
            temperature=temperature,
            seed=derive_seed(ctx.config.seed, unit, t_index, ctx.rank),
        )
        result.cells[key] = cell_metrics(values, baselines[key])
        result.per_answer[key] = values
    return result


# ---------------------------------------------------------------------------- judged win rates

JUDGE_CACHE = "judge-cache"


def make_judge(ctx: StageContext, hp: Hyperparameters) -> judging.PairwiseJudge | None:
    """Rank 0's pairwise judge (every rank takes part in fetching an in-pod judge's weights)."""
    settings = hp.judge_settings
    if settings is None:
        return None
    if settings.model_from is not None:
        raise ConfigError(
            "hyperparameters.judge.model.from: the operator resolves it to the stage's artifact; "
            "a stage config needs model: {uri: ...}"
        )
    model_dir = None if settings.model_uri is None else loop.fetch_model(ctx, settings.model_uri, "judge")
    if not ctx.is_main:
        return None
    backend: judging.ChatBackend
    if model_dir is not None:
        backend = judging.LocalChat(model_dir, settings, device=ctx.device, batch_size=hp.batch_size)
    else:
        backend = judging.OpenAIChat(settings, api_key=os.environ.get(JUDGE_API_KEY_ENV))
    # Verdicts live beside the stage's checkpoints: a retried evaluate asks nothing twice.
    cache = judging.VerdictCache(storage.join(ctx.config.checkpoints, JUDGE_CACHE))
    return judging.PairwiseJudge(backend, settings.template, cache)


def judged_baselines(hp: Hyperparameters, reference: Unit, given: list[str]) -> dict[str, list[str]]:
    """What the judge compares with at each temperature: the data's answers, or the reference's."""
    return {key: given if hp.baseline == "data" else texts for key, texts in reference.texts.items()}


def judge_unit(
    ctx: StageContext,
    hp: Hyperparameters,
    judge: judging.PairwiseJudge | None,
    *,
    unit: int,
    cells: Unit,
    baselines: dict[str, list[str]],
    queries: list[str],
) -> None:
    """Add each cell's judged win rate against the baseline's answers (rank 0 asks, all get it)."""
    found: dict[str, dict[str, float]] = {}
    settings = hp.judge_settings
    if judge is not None and settings is not None:
        for t_index, key in enumerate(cells.cells):
            judged = judge.judge(queries, cells.texts[key], baselines[key])
            found[key] = judged.summary(
                cells.texts[key],
                baselines[key],
                length_controlled=settings.length_controlled,
                seed=derive_seed(ctx.config.seed, unit, t_index),
            )
        ctx.emit({"event": "judged", "unit": unit, "asked": float(judge.asked)})
    for key, values in ctx.broadcast(found).items():
        cells.cells[key].update(values)


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
                # A renamed policy list invalidates the old numbering; an older layout is redone.
                if doc.get("name") == name and "per_answer" in doc:
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
    judge = make_judge(ctx, hp)
    queries = [
        data.prompt_text(row, judging.query_format) for row in rows for _ in range(hp.samples_per_prompt)
    ]
    data_baseline = None
    given: list[str] = []
    if hp.baseline == "data":
        given = [reference_answer(row, chat_format) for row in rows for _ in range(hp.samples_per_prompt)]
        scored = {"reward": judges.judge.score(prompts, given[ctx.rank :: ctx.world_size])}
        data_baseline = in_global_order(ctx, scored)["reward"]
    reference = use_fast_masks(models.load_causal_lm(reference_dir)).to(ctx.device).eval()

    names = [REFERENCE, *sorted(inputs.policies)]
    done = _load_done(ctx, names)
    if done:
        ctx.emit({"event": "resumed", "done": [names[unit] for unit in sorted(done)]})

    units: dict[str, Unit] = {}
    if 0 in done:
        units[REFERENCE] = _unit(done[0])
        best = done[0].get(BEST_OF_N)
        baselines = done[0]["baselines"]
    else:
        with ctx.accelerator.autocast():
            units[REFERENCE], best, baselines = evaluate_reference(
                ctx,
                hp,
                reference=reference,
                tokenizer=tokenizer,
                prompts=prompts,
                judges=judges,
                data_baseline=data_baseline,
            )
        if hp.baseline == "data":  # against its own answers the reference would only tie
            judge_unit(
                ctx,
                hp,
                judge,
                unit=0,
                cells=units[REFERENCE],
                baselines=judged_baselines(hp, units[REFERENCE], given),
                queries=queries,
            )
        # The baselines are saved so a resumed run compares against the same answers.
        _save_unit(
            ctx,
            0,
            {
                "name": REFERENCE,
                **_unit_doc(units[REFERENCE]),
                "baselines": baselines,
                "texts": units[REFERENCE].texts,  # every answer: the judge's baseline
                BEST_OF_N: best,
            },
        )
    ctx.emit({"step": 1, "total_steps": len(names), "policy": REFERENCE, **_headline(units[REFERENCE].cells)})
    baseline_texts = judged_baselines(hp, units[REFERENCE], given)

    for unit, name in enumerate(names[1:], start=1):
        if unit in done:
            units[name] = _unit(done[unit])
        else:
            policy_dir = loop.fetch_model(ctx, inputs.policies[name], f"policy-{unit}")
            policy = use_fast_masks(models.load_causal_lm(policy_dir)).to(ctx.device).eval()
            # The same autocast for the policy and the reference: precision alone must not show up as KL.
            with ctx.accelerator.autocast():
                units[name] = evaluate_policy(
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
            judge_unit(
                ctx, hp, judge, unit=unit, cells=units[name], baselines=baseline_texts, queries=queries
            )
            _save_unit(ctx, unit, {"name": name, **_unit_doc(units[name])})
        ctx.emit(
            {"step": unit + 1, "total_steps": len(names), "policy": name, **_headline(units[name].cells)}
        )

    report: dict[str, Any] = {
        "policies": {name: unit.cells for name, unit in units.items()},
        "per_answer": {name: unit.per_answer for name, unit in units.items()},
        "kl_method": "exact",
        "judge": judges.judge.name,
        "pairwise_judge": None if hp.judge_settings is None else _judge_description(hp),
        "baseline": hp.baseline,
        "prompts": len(all_prompts),
        "samples_per_prompt": hp.samples_per_prompt,
        "answers": {name: unit.answers for name, unit in units.items()},
    }
    if best is not None:
        report[BEST_OF_N] = best

    def write(dest: Path) -> None:
        (dest / RESULTS_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
        if hp.plot:
            plot_frontier(report, dest / PLOT_FILE)

    metrics = _summary(report)
    runtime.publish_results(ctx, report, write)
    return metrics


def _unit_doc(unit: Unit) -> dict[str, Any]:
    return {"results": unit.cells, "per_answer": unit.per_answer, "answers": unit.answers}


def _unit(doc: dict[str, Any]) -> Unit:
    return Unit(doc["results"], doc["per_answer"], doc.get("answers", {}), doc.get("texts", {}))


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
    keys = ("reward", "kl", "win_rate", "judge_win_rate", "judge_win_rate_low", "judge_win_rate_high")
    return {key: last[key] for key in keys if key in last}


def _judge_description(hp: Hyperparameters) -> dict[str, Any]:
    settings = hp.judge_settings
    assert settings is not None
    return {
        "judge": settings.model_uri or f"{settings.model}@{settings.endpoint}",
        "template": settings.template if settings.template in judging.TEMPLATES else "custom",
        "orders": "both (A/B and B/A); disagreeing orders count as a tie",
        "interval": "95% percentile bootstrap over prompts",
    }


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Compact per-policy figures for the termination message (<= 4 KB): the mean over temperatures."""
    out: dict[str, Any] = {"prompts": report["prompts"], "judge": report["judge"]}
    for name, cells in report["policies"].items():
        for metric in ("reward", "win_rate", "kl", "judge_win_rate"):
            values = [c[metric] for c in cells.values() if metric in c]
            if values:
                out[f"{name}/{metric}"] = round(sum(values) / len(values), 5)
    return out


def plot_frontier(report: dict[str, Any], path: Path) -> None:
    """Reward against KL (one point per temperature) and win rate against temperature."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (frontier, wins) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = dict(report["policies"])
    if BEST_OF_N in report:
        series[f"best of {report[BEST_OF_N]['n']} (KL: analytic bound)"] = report[BEST_OF_N]["temperatures"]
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
