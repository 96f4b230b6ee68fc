"""Generate stage: sample K answers per prompt from a policy and label them into preference data.

Step 1 of the RLHF pipeline in the DPO paper ("sample completions, label preferences"): the
labeller is a reward stage's model (``inputs.reward_model``) or a named ground-truth scorer
(``hyperparameters.scorer``, e.g. ``vader`` for the controlled-sentiment task).

    python -m kubealign_jobs.generate --config stage.json
    torchrun --nproc_per_node 8 -m kubealign_jobs.generate --config stage.json   # each rank samples a share

Inputs: ``model`` (the policy that samples, usually the SFT artifact) and ``data`` (any rows
with a prompt). The artifact holds exactly one dataset file, in the format the reward and dpo
stages read, with the labeller's scores kept alongside:

- ``output_format: best_worst`` (default) -> ``preferences.jsonl``, one
  ``{prompt, chosen, rejected, chosen_score, rejected_score}`` row per prompt (highest vs
  lowest score);
- ``all_pairs`` -> ``preferences.jsonl``, every pair whose scores differ by more than
  ``min_margin``;
- ``ranking`` -> ``rankings.jsonl``, ``{prompt, responses: [best, ..., worst], scores}``.

Empty answers are dropped (the trainers reject empty strings), duplicates collapse to one,
and pairs tied within ``min_margin`` carry no preference, so they are not written.

Prompts are processed in chunks; each finished chunk's samples are published atomically under
``<output>/checkpoints/chunk-XXXXXXXX/`` and a restarted stage skips them. Every chunk is
sampled from its own seed, so a resumed run writes the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from kubealign_jobs import data, loop, runtime, scorers, storage
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.config import derive_seed
from kubealign_jobs.runtime import StageContext
from kubealign_jobs.sampling import SamplingParams, sample
from kubealign_jobs.stages import GenerateHyperparameters as Hyperparameters

CHUNK_PREFIX = "chunk-"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class LabelledPrompt:
    """One prompt, its K sampled answers and their scores (sample order)."""

    index: int
    prompt: str
    completions: list[str]
    scores: list[float]

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "prompt": self.prompt,
                "completions": self.completions,
                "scores": self.scores,
            }
        )

    @classmethod
    def from_json(cls, line: str) -> LabelledPrompt:
        doc = json.loads(line)
        return cls(
            index=int(doc["index"]),
            prompt=str(doc["prompt"]),
            completions=list(doc["completions"]),
            scores=[float(s) for s in doc["scores"]],
        )


def ranked_answers(labelled: LabelledPrompt) -> list[tuple[str, float]]:
    """Distinct non-empty answers, best first (a stable sort keeps sample order among equal scores)."""
    seen: set[str] = set()
    answers = []
    for completion, score in zip(labelled.completions, labelled.scores, strict=True):
        if completion.strip() and completion not in seen:
            seen.add(completion)
            answers.append((completion, score))
    return sorted(answers, key=lambda answer: -answer[1])


def preference_rows(
    labelled: LabelledPrompt, *, output_format: str, min_margin: float
) -> list[dict[str, Any]]:
    """The dataset rows one labelled prompt contributes (possibly none)."""
    answers = ranked_answers(labelled)
    if len(answers) < 2:
        return []
    if output_format == "ranking":
        return [
            {
                "prompt": labelled.prompt,
                "responses": [text for text, _ in answers],
                "scores": [score for _, score in answers],
            }
        ]
    pairs = [(answers[0], answers[-1])] if output_format == "best_worst" else list(combinations(answers, 2))
    return [
        {
            "prompt": labelled.prompt,
            "chosen": chosen,
            "rejected": rejected,
            "chosen_score": chosen_score,
            "rejected_score": rejected_score,
        }
        for (chosen, chosen_score), (rejected, rejected_score) in pairs
        if chosen_score - rejected_score > min_margin
    ]


def dataset_stats(labelled: list[LabelledPrompt], rows: list[dict[str, Any]]) -> dict[str, float]:
    scores = [score for item in labelled for score in item.scores]
    margins = [row["chosen_score"] - row["rejected_score"] for row in rows if "chosen_score" in row]
    empty = sum(1 for item in labelled for completion in item.completions if not completion.strip())
    return {
        "prompts": float(len(labelled)),
        "samples": float(len(scores)),
        "rows": float(len(rows)),
        "mean_score": statistics.fmean(scores) if scores else math.nan,
        "score_std": statistics.pstdev(scores) if scores else math.nan,
        "mean_margin": statistics.fmean(margins) if margins else math.nan,
        "empty_answers": float(empty),
    }


# ---------------------------------------------------------------------------- the stage


def _chunk_uri(config_checkpoints: str, chunk: int) -> str:
    return storage.join(config_checkpoints, f"{CHUNK_PREFIX}{chunk:08d}")


def label_prompts(
    *,
    policy: Any,
    tokenizer: Any,
    labeller: scorers.Scorer,
    prompts: list[tuple[int, str]],
    hp: Hyperparameters,
) -> list[LabelledPrompt]:
    """K samples for each (index, prompt), scored by ``labeller``."""
    if not prompts:
        return []
    repeated = [prompt for _, prompt in prompts for _ in range(hp.samples_per_prompt)]
    samples = sample(
        policy,
        tokenizer,
        repeated,
        SamplingParams(
            max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k
        ),
        batch_size=hp.batch_size,
        max_prompt_tokens=hp.max_prompt_tokens,
    )
    scores = labeller.score(samples.prompts, samples.completions)
    k = hp.samples_per_prompt
    return [
        LabelledPrompt(
            index=index,
            prompt=prompt,
            completions=samples.completions[i * k : (i + 1) * k],
            scores=scores[i * k : (i + 1) * k],
        )
        for i, (index, prompt) in enumerate(prompts)
    ]


def ground_truth_agreement(labelled: list[LabelledPrompt], ground_truth: scorers.Scorer) -> float:
    """Fraction of prompts whose best and worst labelled answers the ground truth orders the same way.

    Ties under the label are skipped; a ground-truth tie counts one half.
    """
    pairs = []
    for item in labelled:
        order = sorted(range(len(item.scores)), key=lambda i: item.scores[i])
        if item.scores[order[-1]] > item.scores[order[0]]:
            pairs.append((item.prompt, item.completions[order[-1]], item.completions[order[0]]))
    if not pairs:
        return float("nan")
    prompts = [p for p, _, _ in pairs]
    best = ground_truth.score(prompts, [b for _, b, _ in pairs])
    worst = ground_truth.score(prompts, [w for _, _, w in pairs])
    agree = sum(1.0 if b > w else 0.5 if b == w else 0.0 for b, w in zip(best, worst, strict=True))
    return agree / len(pairs)


def train(ctx: StageContext, hp: Hyperparameters) -> dict[str, Any]:
    """The generate stage (called by `runtime.run_stage`)."""
    config = ctx.config
    model_uri = loop.require_input(config.inputs.model, "inputs.model")
    data_uri = loop.require_input(config.inputs.data, "inputs.data")
    # With a reward model and a scorer, the reward model labels and the scorer measures how often
    # the true ordering agrees with the label (the label noise a reward stage trains on).
    labeller, ground_truth = scorers.reward_sources(
        config.inputs.reward_model,
        hp,
        ctx.scratch,
        device=ctx.device,
        batch_size=hp.batch_size,
        stage="generate",
    )
    model_dir = loop.fetch_model(ctx, model_uri, "policy")
    tokenizer = models.load_tokenizer(model_dir)
    chat_format = data.tokenizer_chat_format(tokenizer)
    prompts = data.load(data_uri, ctx.scratch / "data", lambda row: data.prompt_text(row, chat_format))
    if hp.max_prompts:
        prompts = prompts[: hp.max_prompts]
    policy = use_fast_masks(models.load_causal_lm(model_dir)).to(ctx.device).eval()

    chunks = math.ceil(len(prompts) / hp.chunk_prompts)
    done: set[int] = set()
    if ctx.is_main:
        done = {c for c in range(chunks) if storage.is_complete(_chunk_uri(config.checkpoints, c))}
    done = ctx.broadcast(done)
    if done:
        ctx.emit({"event": "resumed", "chunks_done": len(done), "chunks": chunks})

    for chunk in range(chunks):
        if chunk in done:
            continue
        start = chunk * hp.chunk_prompts
        indexed = [(i, prompts[i]) for i in range(start, min(start + hp.chunk_prompts, len(prompts)))]
        torch.manual_seed(derive_seed(config.seed, chunk, ctx.rank))
        # Mixed precision (bf16 on GPUs that have it) for sampling and the reward model alike.
        with ctx.accelerator.autocast():
            mine = label_prompts(
                policy=policy,
                tokenizer=tokenizer,
                labeller=labeller,
                prompts=indexed[ctx.rank :: ctx.world_size],
                hp=hp,
            )
        gathered = ctx.gather([item.to_json() for item in mine])
        if ctx.is_main:
            local = ctx.scratch / "chunk"
            local.mkdir(parents=True, exist_ok=True)
            lines = sorted(
                (LabelledPrompt.from_json(line) for part in gathered for line in part), key=lambda x: x.index
            )
            (local / SAMPLES_FILE).write_text("".join(item.to_json() + "\n" for item in lines))
            storage.publish_dir(local, _chunk_uri(config.checkpoints, chunk), metadata={"chunk": chunk})
            ctx.emit({"step": chunk + 1, "total_steps": chunks, "prompts": start + len(indexed)})
        ctx.barrier()

    # Rank 0 assembles the dataset; the outcome (metrics or the reason there is no data) goes to
    # every rank, so all of them succeed or fail together.
    rows: list[dict[str, Any]] = []
    outcome: tuple[dict[str, Any], str | None] = ({}, None)
    if ctx.is_main:
        labelled = _read_chunks(config.checkpoints, chunks, ctx.scratch / "chunks")
        rows = [
            row
            for item in labelled
            for row in preference_rows(item, output_format=hp.output_format, min_margin=hp.min_margin)
        ]
        stats = {**dataset_stats(labelled, rows), "output_file": hp.output_file, "labeller": labeller.name}
        if ground_truth is not None:
            stats["ground_truth_agreement"] = ground_truth_agreement(labelled, ground_truth)
        outcome = (
            stats,
            None
            if rows
            else f"{data_uri}: no preference rows: every prompt's answers were empty, identical or tied "
            f"within min_margin={hp.min_margin}",
        )
    metrics: dict[str, Any]
    metrics, error = ctx.broadcast(outcome)
    if error is not None:
        raise data.DataError(error)

    def write(dest: Path) -> None:
        (dest / hp.output_file).write_text("".join(json.dumps(row) + "\n" for row in rows))

    runtime.publish_results(ctx, metrics, write, format=hp.output_format)
    return metrics


def _read_chunks(checkpoints_uri: str, chunks: int, scratch: Path) -> list[LabelledPrompt]:
    labelled: list[LabelledPrompt] = []
    for chunk in range(chunks):
        folder = storage.fetch_dir(
            _chunk_uri(checkpoints_uri, chunk), scratch / str(chunk), require_manifest=True
        )
        text = (folder / SAMPLES_FILE).read_text()
        labelled.extend(LabelledPrompt.from_json(line) for line in text.splitlines() if line.strip())
    return labelled


def main(argv: list[str] | None = None) -> int:
    return runtime.run_stage("generate", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
