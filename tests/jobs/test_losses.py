"""Preference losses against hand-computed values, gradient directions and stability."""

from __future__ import annotations

import math

import pytest
import torch

from kubealign_jobs.losses import (
    bradley_terry_loss,
    dpo_loss,
    plackett_luce_loss,
    plackett_luce_losses,
    ranking_agreement,
)

LN2 = math.log(2.0)


def test_dpo_loss_is_ln2_when_policy_equals_reference() -> None:
    logps = torch.tensor([-3.0, -10.0, -0.5])
    other = torch.tensor([-7.0, -1.0, -2.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, other, logps, other, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), LN2))
    torch.testing.assert_close(chosen_rewards, torch.zeros(3))
    torch.testing.assert_close(rejected_rewards, torch.zeros(3))


@pytest.mark.parametrize(
    ("pc", "pr", "rc", "rr", "beta"),
    [
        (-1.0, -2.0, -1.5, -1.5, 0.1),  # policy moved towards chosen: margin 0.5 + 0.5
        (-4.0, -1.0, -2.0, -2.0, 0.5),  # policy moved towards rejected
        (-20.0, -20.0, -30.0, -10.0, 1.0),
        (0.0, -1000.0, 0.0, 0.0, 2.0),  # extreme margin: must stay finite, ~0
    ],
)
def test_dpo_loss_matches_hand_formula(pc: float, pr: float, rc: float, rr: float, beta: float) -> None:
    margin = beta * ((pc - rc) - (pr - rr))
    expected = math.log1p(math.exp(-margin)) if margin > -30 else -margin
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([pc]), torch.tensor([pr]), torch.tensor([rc]), torch.tensor([rr]), beta
    )
    assert losses.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert chosen_rewards.item() == pytest.approx(beta * (pc - rc))
    assert rejected_rewards.item() == pytest.approx(beta * (pr - rr))
    assert torch.isfinite(losses).all()


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([-5.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -1.0], requires_grad=True)
    losses, chosen_rewards, _ = dpo_loss(
        chosen, rejected, torch.tensor([-5.0, -3.0]), torch.tensor([-5.0, -1.0]), 0.1
    )
    losses.sum().backward()  # type: ignore[no-untyped-call]
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all()  # descending the loss increases log pi(y_w|x)
    assert (rejected.grad > 0).all()  # ... and decreases log pi(y_l|x)
    # At policy == reference, d loss / d chosen_logp = -beta * sigmoid(0) = -beta / 2.
    assert chosen.grad[0].item() == pytest.approx(-0.05)
    assert not chosen_rewards.requires_grad


def test_dpo_loss_is_per_example_and_decreasing_in_margin() -> None:
    margins = torch.linspace(-3, 3, 7)
    losses, _, _ = dpo_loss(margins, torch.zeros(7), torch.zeros(7), torch.zeros(7), beta=1.0)
    assert losses.shape == (7,)
    assert (losses[1:] < losses[:-1]).all()


def test_bradley_terry_hand_values_and_gradient() -> None:
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1.0)) + LN2 + math.log1p(math.exp(2.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()  # type: ignore[no-untyped-call]
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_bradley_terry_stable_for_huge_scores() -> None:
    loss = bradley_terry_loss(torch.tensor([1e4, -1e4]), torch.tensor([-1e4, 1e4]))
    assert loss.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2


def test_plackett_luce_with_two_answers_equals_bradley_terry() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 2, generator=generator) * 3
    pl = plackett_luce_loss(scores)
    bt = bradley_terry_loss(scores[:, 0], scores[:, 1])
    torch.testing.assert_close(pl, bt)


def test_plackett_luce_three_answers_hand_value() -> None:
    scores = torch.tensor([[3.0, 1.0, 0.0]])
    # -log(e^3/(e^3+e^1+e^0)) - log(e^1/(e^1+e^0))
    expected = -(3 - math.log(math.exp(3) + math.exp(1) + 1)) - (1 - math.log(math.exp(1) + 1))
    assert plackett_luce_loss(scores).item() == pytest.approx(expected, rel=1e-6)


def test_plackett_luce_prefers_correct_order_and_is_stable() -> None:
    right = plackett_luce_loss(torch.tensor([[3.0, 2.0, 1.0, 0.0]]))
    wrong = plackett_luce_loss(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert right < wrong
    huge = plackett_luce_loss(torch.tensor([[1e5, 0.0, -1e5]]))
    assert torch.isfinite(huge) and huge.item() == pytest.approx(0.0, abs=1e-6)


def test_plackett_luce_ragged_rankings_match_unpadded() -> None:
    scores = torch.tensor([[0.3, -0.2, 1.5, 99.0], [1.0, 2.0, 0.0, -1.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    losses = plackett_luce_losses(scores, valid)
    torch.testing.assert_close(losses[0], plackett_luce_losses(scores[:1, :3].detach())[0])
    torch.testing.assert_close(losses[1], plackett_luce_losses(scores[1:].detach())[0])
    losses.sum().backward()  # type: ignore[no-untyped-call]
    assert scores.grad is not None
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 3].item() == 0.0


def test_ranking_agreement_counts_ordered_pairs() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    correct, total = ranking_agreement(scores, valid)
    assert (int(correct), int(total)) == (3, 4)  # row 0: (0,1) (0,2) right, (1,2) wrong; row 1: 1 of 1
