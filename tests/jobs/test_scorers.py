"""Ground-truth scorers: VADER offline, the word-fraction toy reward, and the registry's errors."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import scorers


def test_vader_scores_sentiment_without_any_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the vader scorer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    scorer = scorers.make_scorer("vader")
    positive, negative, neutral = scorer.score(
        ["The film", "The film", "The film"],
        [" was wonderful and the acting was great.", " was awful and boring.", " was shown on Tuesday."],
    )
    assert positive > 0.5
    assert negative < -0.5
    assert neutral == 0.0
    assert scorer.name == "vader"


def test_vader_scores_the_completion_not_the_prompt() -> None:
    scorer = scorers.make_scorer("vader")
    [score] = scorer.score(["What a terrible, horrible, awful day."], [" It was fine."])
    assert score > 0


def test_word_fraction_counts_words() -> None:
    scorer = scorers.make_scorer("word_fraction", {"words": ["good", "great"]})
    assert scorer.score(["p", "p", "p"], ["good good bad bad", "great", ""]) == [0.5, 1.0, 0.0]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("vaderr", None, r"hyperparameters.scorer: unknown scorer 'vaderr' \(known: vader, word_fraction\)"),
        ("vader", {"lexicon": "x"}, "scorer_options.lexicon: the vader scorer takes no options"),
        ("word_fraction", {}, "hyperparameters.scorer_options.words: the word_fraction scorer needs"),
        ("word_fraction", {"words": "good"}, "hyperparameters.scorer_options.words"),
        ("word_fraction", {"words": ["a"], "case": True}, "scorer_options.case: unknown option"),
    ],
)
def test_bad_scorer_config_names_the_field(name: str, options: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(scorers.ScorerError, match=message):
        scorers.make_scorer(name, options)


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorers.make_scorer("vader").score(["a", "b"], ["c"])


def test_reward_model_scorer_is_independent_of_batching(tmp_path: Path) -> None:
    from tests.jobs.rlhf_toys import save_toy_reward_model

    folder = save_toy_reward_model(tmp_path / "reward")
    scorer = scorers.load_reward_model_scorer(str(folder), tmp_path / "scratch", device="cpu", batch_size=2)
    prompts = ["the movie", "the plot was very", "very", "the movie is", "the"]
    completions = [
        "good",
        "bad and dull dull dull",
        "fine great",
        "the plot",
        "good good good good good good",
    ]
    batched = scorer.score(prompts, completions)
    # Padding to the longest sequence in a batch must not change any score.
    one_by_one = [scorer.score([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(batched)) == len(batched)
