"""Named ground-truth scorers: a number per (prompt, completion), larger is better.

The generate, ppo and evaluate stages take either a reward-model artifact or one of these by
name (``hyperparameters.scorer``, options in ``hyperparameters.scorer_options``). A ground-truth
scorer plays the role of the human labeller in the paper's controlled-sentiment experiment:
it labels preference pairs for the reward model and measures what the policies really achieve.

- ``vader``: VADER's compound sentiment of the completion, in [-1, 1]. vaderSentiment ships
  its lexicon inside the package, so it runs offline.
- ``word_fraction``: the fraction of the completion's words found in ``words``; a reward whose
  optimum is known exactly, for toy tasks and tests.

`RewardModelScorer` gives a reward stage's artifact the same interface, so the stages treat
a learned reward and a ground-truth one alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kubealign_jobs import data, hub, storage
from kubealign_jobs import model as models
from kubealign_jobs.attention import use_fast_masks
from kubealign_jobs.config import ConfigError
from kubealign_jobs.stages import RewardSourceHyperparameters


class ScorerError(ConfigError):
    """An unknown scorer name or bad options; the message names the hyperparameter at fault."""


class Scorer(Protocol):
    """Scores completions of prompts; one float per pair, larger is better."""

    @property
    def name(self) -> str: ...

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


class VaderScorer:
    """VADER's compound sentiment of the completion alone (the prompt is not the policy's doing)."""

    name = "vader"

    def __init__(self) -> None:
        # Imported here: only the stages that use VADER pay for loading its lexicon.
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in completions]


@dataclass(frozen=True)
class WordFractionScorer:
    """Fraction of the completion's whitespace-separated words that are in ``words``."""

    words: frozenset[str]
    name: str = "word_fraction"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        scores = []
        for text in completions:
            tokens = text.split()
            scores.append(sum(token in self.words for token in tokens) / len(tokens) if tokens else 0.0)
        return scores


class RewardModelScorer:
    """Scores with a reward model, batched, on ``[bos] prompt completion [eos]`` as it was trained.

    The texts are re-tokenised with the reward model's own tokenizer exactly the way the
    reward stage encodes preference rows (`data.encode_prompt_completion`), so the policy may
    use a different tokenizer and the score does not depend on how the policy split its text.
    """

    name = "reward_model"

    def __init__(
        self, reward_model: Any, tokenizer: Any, *, batch_size: int = 64, max_length: int = 512
    ) -> None:
        self.reward_model = reward_model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        device = next(self.reward_model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [
                data.encode_prompt_completion(self.tokenizer, prompt, completion, max_length=self.max_length)
                for prompt, completion in zip(
                    prompts[start : start + self.batch_size],
                    completions[start : start + self.batch_size],
                    strict=True,
                )
            ]
            batch = data.collate(encoded, pad_token_id=int(self.tokenizer.pad_token_id)).to(device)
            scores.extend(
                models.reward_scores(self.reward_model, batch.input_ids, batch.attention_mask).tolist()
            )
        return scores


def load_reward_model_scorer(
    uri: str, scratch: Path, *, device: Any, batch_size: int = 64, max_length: int = 512
) -> RewardModelScorer:
    """Fetch a reward stage's artifact (or any reward-model folder) and wrap it as a scorer."""
    folder = hub.fetch(uri) if hub.is_hub_uri(uri) else storage.fetch_dir(uri, scratch / "reward_model")
    tokenizer = models.load_tokenizer(folder)
    reward_model = use_fast_masks(models.load_reward_model(folder, tokenizer=tokenizer)).to(device)
    reward_model.requires_grad_(False)
    return RewardModelScorer(reward_model, tokenizer, batch_size=batch_size, max_length=max_length)


def score_tensor(scorer: Scorer, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """Scores as a float32 (B,) tensor on the CPU."""
    return torch.tensor(scorer.score(prompts, completions), dtype=torch.float32)


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"scorer: {len(prompts)} prompts but {len(completions)} completions")


def _vader(options: dict[str, Any], where: str) -> Scorer:
    if options:
        raise ScorerError(f"{where}_options.{sorted(options)[0]}: the vader scorer takes no options")
    return VaderScorer()


def _word_fraction(options: dict[str, Any], where: str) -> Scorer:
    unknown = sorted(set(options) - {"words"})
    if unknown:
        raise ScorerError(f"{where}_options.{unknown[0]}: unknown option (known: words)")
    words = options.get("words")
    if not isinstance(words, list) or not words or not all(isinstance(word, str) for word in words):
        raise ScorerError(
            f"{where}_options.words: the word_fraction scorer needs a non-empty list of strings"
        )
    return WordFractionScorer(words=frozenset(words))


SCORERS: dict[str, Callable[[dict[str, Any], str], Scorer]] = {
    "vader": _vader,
    "word_fraction": _word_fraction,
}


def make_scorer(
    name: str, options: dict[str, Any] | None = None, *, where: str = "hyperparameters.scorer"
) -> Scorer:
    """Build the scorer registered as ``name``; ``where`` names the config field in errors."""
    factory = SCORERS.get(name)
    if factory is None:
        raise ScorerError(f"{where}: unknown scorer {name!r} (known: {', '.join(sorted(SCORERS))})")
    if options is not None and not isinstance(options, dict):
        raise ScorerError(f"{where}_options: expected an object")
    return factory(dict(options or {}), where)


def reward_sources(
    reward_model_uri: str | None,
    hp: RewardSourceHyperparameters,
    scratch: Path,
    *,
    device: Any,
    batch_size: int,
    stage: str,
) -> tuple[Scorer, Scorer | None]:
    """The one reward-source rule of generate, ppo and evaluate: (reward, ground truth or None).

    With ``inputs.reward_model`` the learned reward is the reward (what PPO optimises, what
    generate labels with) and a named ``hyperparameters.scorer``, if also given, is the ground
    truth reported beside it. Without a reward model the scorer is the reward. The catalogue
    refuses a stage with neither, so this error is the trainer's last line of defence.
    """
    ground_truth = make_scorer(hp.scorer, hp.scorer_options) if hp.scorer else None
    if reward_model_uri:
        reward = load_reward_model_scorer(
            reward_model_uri, scratch, device=device, batch_size=batch_size, max_length=hp.reward_max_length
        )
        return reward, ground_truth
    if ground_truth is None:
        raise ConfigError(
            f"inputs.reward_model: the {stage} stage needs a reward model or hyperparameters.scorer"
        )
    return ground_truth, None
