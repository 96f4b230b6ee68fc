"""The stage catalogue on the trainer side: every entry has its trainer, names its scorers right,
parses its own defaults, and the reward-source rule works as documented."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from kubealign_jobs import config, scorers, stages
from kubealign_jobs.generate import LabelledPrompt, ground_truth_agreement
from kubealign_jobs.stages import CATALOGUE


@pytest.mark.parametrize("name", stages.STAGE_TYPES)
def test_every_stage_type_has_a_trainer_module_with_main(name: str) -> None:
    module = importlib.import_module(CATALOGUE[name].module)
    assert callable(module.main)


def test_the_catalogue_names_exactly_the_registered_scorers() -> None:
    assert set(stages.SCORERS) == set(scorers.SCORERS)


@pytest.mark.parametrize("name", stages.STAGE_TYPES)
def test_defaults_parse_to_the_default_dataclass(name: str) -> None:
    entry = CATALOGUE[name]
    assert stages.parse_hyperparameters(name, stages.defaults(name)) == entry.hyperparameters()
    assert all(p.doc for p in entry.params)


def test_a_bad_value_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(config.ConfigError, match=r"hyperparameters\.beta: expected a number, got 'high'"):
        stages.parse_hyperparameters("dpo", {"beta": "high"})
    with pytest.raises(config.ConfigError, match=r"hyperparameters\.ppo_epoch: .*did you mean ppo_epochs\?"):
        stages.parse_hyperparameters("ppo", {"ppo_epoch": 2})
    assert stages.parse_hyperparameters("dpo", {"beta": 1}).beta == 1.0  # an integer is a number


def test_derive_seed_is_deterministic_and_separates_streams() -> None:
    assert config.derive_seed(0, 3, 1) == config.derive_seed(0, 3, 1)
    seeds = {config.derive_seed(s, step, rank) for s in range(3) for step in range(50) for rank in range(8)}
    assert len(seeds) == 3 * 50 * 8
    assert 0 <= config.derive_seed(2**62, 2**62, 2**62) < 2**63


def test_without_a_reward_model_the_scorer_is_the_reward_and_with_neither_it_is_an_error(
    tmp_path: Path,
) -> None:
    hp = stages.PPOHyperparameters(scorer="word_fraction", scorer_options={"words": ["good"]})
    with pytest.raises(config.ConfigError, match=r"inputs\.reward_model: the ppo stage needs a reward model"):
        scorers.reward_sources(
            None, stages.PPOHyperparameters(), tmp_path, device=torch.device("cpu"), batch_size=2, stage="ppo"
        )
    reward, ground_truth = scorers.reward_sources(
        None, hp, tmp_path, device=torch.device("cpu"), batch_size=2, stage="ppo"
    )
    assert reward.name == "word_fraction" and ground_truth is None


def test_ground_truth_agreement_counts_prompts_whose_best_and_worst_the_truth_orders_alike() -> None:
    truth = scorers.WordFractionScorer(words=frozenset({"good"}))
    labelled = [
        LabelledPrompt(
            index=0, prompt="a", completions=["good good", "bad bad"], scores=[1.0, 0.0]
        ),  # agrees
        LabelledPrompt(index=1, prompt="b", completions=["good", "bad"], scores=[0.0, 1.0]),  # disagrees
        LabelledPrompt(index=2, prompt="c", completions=["bad", "bad"], scores=[0.0, 1.0]),  # truth ties: 1/2
        LabelledPrompt(
            index=3, prompt="d", completions=["good", "bad"], scores=[0.5, 0.5]
        ),  # label tie: skipped
    ]
    assert ground_truth_agreement(labelled, truth) == pytest.approx(1.5 / 3)
    assert math.isnan(ground_truth_agreement(labelled[3:], truth))
