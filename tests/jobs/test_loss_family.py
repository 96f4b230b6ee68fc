"""The DPO family, SimPO and KTO: hand-computed values, gradient signs, known values at the
reference, and TRL's own implementations where they are functions of log-probs."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubealign_jobs.losses import dpo_loss, kto_loss, simpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


BATCH = {
    "pc": torch.tensor([-10.0, -12.0, -7.5], dtype=torch.float64),
    "pr": torch.tensor([-11.0, -11.5, -9.0], dtype=torch.float64),
    "rc": torch.tensor([-10.5, -12.0, -8.0], dtype=torch.float64),
    "rr": torch.tensor([-10.8, -11.0, -8.5], dtype=torch.float64),
}


def delta(i: int) -> float:
    b = {k: v[i].item() for k, v in BATCH.items()}
    return (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "formula"),
    [
        ("sigmoid", 0.0, lambda d, beta, e: -log_sigmoid(beta * d)),
        ("sigmoid", 0.1, lambda d, beta, e: -(1 - e) * log_sigmoid(beta * d) - e * log_sigmoid(-beta * d)),
        (
            "robust",
            0.1,
            lambda d, beta, e: (-(1 - e) * log_sigmoid(beta * d) + e * log_sigmoid(-beta * d)) / (1 - 2 * e),
        ),
        ("ipo", 0.0, lambda d, beta, e: (d - 1 / (2 * beta)) ** 2),
        ("hinge", 0.0, lambda d, beta, e: max(0.0, 1 - beta * d)),
    ],
)
def test_each_dpo_loss_type_against_its_formula(loss_type: str, smoothing: float, formula: Any) -> None:
    beta = 0.5
    losses, chosen, rejected = dpo_loss(
        BATCH["pc"],
        BATCH["pr"],
        BATCH["rc"],
        BATCH["rr"],
        beta,
        loss_type=loss_type,
        label_smoothing=smoothing,
    )
    for i in range(3):
        assert losses[i].item() == pytest.approx(formula(delta(i), beta, smoothing), rel=1e-12)
    # The implicit rewards do not depend on the loss type.
    assert chosen.tolist() == pytest.approx((beta * (BATCH["pc"] - BATCH["rc"])).tolist())
    assert rejected.tolist() == pytest.approx((beta * (BATCH["pr"] - BATCH["rr"])).tolist())


def test_ipo_averages_each_log_ratio_over_its_tokens() -> None:
    lengths = (torch.tensor([4, 2, 1]), torch.tensor([2, 5, 1]))
    losses, _, _ = dpo_loss(
        BATCH["pc"], BATCH["pr"], BATCH["rc"], BATCH["rr"], 0.5, loss_type="ipo", lengths=lengths
    )
    for i in range(3):
        d = (BATCH["pc"][i] - BATCH["rc"][i]) / lengths[0][i] - (BATCH["pr"][i] - BATCH["rr"][i]) / lengths[
            1
        ][i]
        assert losses[i].item() == pytest.approx((d.item() - 1.0) ** 2)


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("sigmoid", 0.2, math.log(2)),
        ("robust", 0.2, math.log(2)),
        ("ipo", 0.0, 1.0),  # (0 - 1/(2 * 0.5))^2
        ("hinge", 0.0, 1.0),
    ],
)
def test_a_policy_equal_to_its_reference_gives_the_known_value(
    loss_type: str, smoothing: float, expected: float
) -> None:
    logps = torch.tensor([-3.0, -7.0])
    other = torch.tensor([-4.0, -2.0])
    losses, chosen, rejected = dpo_loss(
        logps, other, logps, other, 0.5, loss_type=loss_type, label_smoothing=smoothing
    )
    assert losses.tolist() == pytest.approx([expected] * 2)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_every_dpo_loss_pushes_chosen_up_and_rejected_down(loss_type: str) -> None:
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(
        chosen,
        rejected,
        torch.tensor([-5.0]),
        torch.tensor([-5.0]),
        0.5,
        loss_type=loss_type,
        label_smoothing=0.1,
    )
    losses.sum().backward()  # type: ignore[no-untyped-call]
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_an_unknown_loss_type_and_a_robust_smoothing_of_one_half_are_refused() -> None:
    args = (BATCH["pc"], BATCH["pr"], BATCH["rc"], BATCH["rr"], 0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="sppo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="robust", label_smoothing=0.5)


def test_simpo_against_its_formula_and_trl_cpo_trainer() -> None:
    chosen = torch.tensor([-1.2, -0.8, -2.0], dtype=torch.float64)
    rejected = torch.tensor([-1.5, -0.7, -2.6], dtype=torch.float64)
    beta, gamma = 2.0, 0.5
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta, gamma)
    for i in range(3):
        expected = -log_sigmoid(beta * (chosen[i].item() - rejected[i].item()) - gamma)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx((beta * chosen).tolist())
    # At equal rewards the loss is -log sigmoid(-gamma): the margin is still to be won.
    equal, _, _ = simpo_loss(chosen, chosen, beta, gamma)
    assert equal.tolist() == pytest.approx([-log_sigmoid(-gamma)] * 3)

    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    # TRL's own function on the same log-probs, with the attributes it reads.
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    theirs, their_chosen, their_rejected = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    torch.testing.assert_close(losses, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, their_chosen)
    torch.testing.assert_close(rejected_rewards, their_rejected)


def test_simpo_pushes_chosen_up_and_rejected_down() -> None:
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    simpo_loss(chosen, rejected, 2.0, 0.5)[0].sum().backward()  # type: ignore[no-untyped-call]
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() < 0 < rejected.grad.item()


def trl_kto(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    weights: tuple[float, float],
) -> torch.Tensor:
    """TRL 1.16 KTOTrainer._compute_loss (loss_type "kto"), line for line, in its own order:
    the desirable answers' losses, then the undesirable ones'."""
    chosen_logratios = policy[desirable] - ref[desirable]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_logratios = policy[~desirable] - ref[~desirable]
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return torch.cat((weights[0] * chosen_losses, weights[1] * rejected_losses), 0)


def test_kto_against_its_formula_and_trl() -> None:
    policy = torch.tensor([-4.0, -6.0, -3.0, -9.0], dtype=torch.float64)
    ref = torch.tensor([-4.5, -5.0, -3.2, -8.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    beta, kl = 0.5, 0.3
    losses, rewards = kto_loss(
        policy, ref, desirable, kl, beta, desirable_weight=1.0, undesirable_weight=1.33
    )
    ratios = (policy - ref).tolist()
    assert losses[0].item() == pytest.approx(1 - sigmoid(beta * (ratios[0] - kl)))
    assert losses[1].item() == pytest.approx(1.33 * (1 - sigmoid(beta * (kl - ratios[1]))))
    assert rewards.tolist() == pytest.approx([beta * r for r in ratios])
    theirs = trl_kto(
        policy, ref, desirable, torch.tensor(kl, dtype=torch.float64), beta=beta, weights=(1.0, 1.33)
    )
    ours_in_trl_order = torch.cat((losses[desirable], losses[~desirable]))
    torch.testing.assert_close(ours_in_trl_order, theirs, rtol=0, atol=1e-12)
    # The reference point is clamped at 0 and carries no gradient.
    negative, _ = kto_loss(policy, ref, desirable, -2.0, beta)
    zero, _ = kto_loss(policy, ref, desirable, 0.0, beta)
    torch.testing.assert_close(negative, zero)


def test_kto_at_the_reference_and_its_gradient_signs() -> None:
    logps = torch.tensor([-2.0, -3.0], requires_grad=True)
    losses, _ = kto_loss(logps, logps.detach(), torch.tensor([True, False]), 0.0, 0.5)
    # At the reference with z = 0 every answer sits at 1 - sigmoid(0) = 1/2.
    assert losses.tolist() == pytest.approx([0.5, 0.5])
    losses.sum().backward()  # type: ignore[no-untyped-call]
    assert logps.grad is not None
    assert logps.grad[0].item() < 0 < logps.grad[1].item()
