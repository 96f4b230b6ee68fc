"""PPO math against hand-worked numbers: GAE, PPO-clip at its boundaries, KL penalty, controllers."""

from __future__ import annotations

import math

import pytest
import torch

from kubealign_jobs import rl


def test_gae_hand_worked_trajectory_with_right_and_left_padding() -> None:
    # gamma = 0.9, λ = 0.8 (so gamma·lambda = 0.72), three real tokens, the sequence reward 1.0 on the last.
    #   t=2: δ = 1 + 0.9·0   - 0.8 =  0.20             A = 0.20
    #   t=1: δ = 0 + 0.9·0.8 - 0.4 =  0.32             A = 0.32 + 0.72·0.20  = 0.464
    #   t=0: δ = 0 + 0.9·0.4 - 0.5 = -0.14             A = -0.14 + 0.72·0.464 = 0.19408
    # returns = A + V = 0.69408, 0.864, 1.0. The padded slot holds a value of 9.0 that must leak nowhere.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8, 9.0], [9.0, 0.5, 0.4, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    advantages, returns = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_advantages = [0.19408, 0.464, 0.20]
    expected_returns = [0.69408, 0.864, 1.0]
    torch.testing.assert_close(advantages[0], torch.tensor([*expected_advantages, 0.0]))
    torch.testing.assert_close(advantages[1], torch.tensor([0.0, *expected_advantages]))
    torch.testing.assert_close(returns[0], torch.tensor([*expected_returns, 0.0]))
    torch.testing.assert_close(returns[1], torch.tensor([0.0, *expected_returns]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 0.3, 2.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    mask = torch.ones_like(rewards)
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[2.2, 2.1, 2.3, 2.0]])
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, reward_to_go - values)


def test_kl_penalty_per_token_and_sequence_score_on_last_real_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -7.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = rl.kl_penalized_rewards(
        scores=torch.tensor([2.0]), logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask, beta=0.1
    )
    # kl_t = log π - log π_ref = [0.5, -1, 0, (pad)]; r_t = -0.1·kl_t, plus the score 2.0 at t = 2.
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))


def test_kl_penalty_on_an_empty_completion_adds_no_score() -> None:
    zeros = torch.zeros(1, 3)
    rewards, _ = rl.kl_penalized_rewards(
        scores=torch.tensor([5.0]), logprobs=zeros, ref_logprobs=zeros, mask=zeros, beta=0.1
    )
    assert rewards.abs().sum().item() == 0.0


def test_kl_estimators_hand_values_and_unknown_name() -> None:
    logprobs = torch.tensor([math.log(0.5)])
    ref_logprobs = torch.tensor([math.log(0.25)])
    log_ratio = math.log(2.0)
    torch.testing.assert_close(
        rl.kl_estimate(logprobs, ref_logprobs, estimator="k1"), torch.tensor([log_ratio])
    )
    torch.testing.assert_close(
        rl.kl_estimate(logprobs, ref_logprobs, estimator="k2"), torch.tensor([0.5 * log_ratio**2])
    )
    # k3 = π_ref/π - 1 - log(π_ref/π) = 0.5 - 1 + ln 2
    torch.testing.assert_close(
        rl.kl_estimate(logprobs, ref_logprobs, estimator="k3"), torch.tensor([-0.5 + log_ratio])
    )
    with pytest.raises(ValueError, match="kl_estimator: 'k9'"):
        rl.kl_estimate(logprobs, ref_logprobs, estimator="k9")


def _policy_loss_case(
    log_ratio: float, advantage: float, clip_range: float = 0.2
) -> tuple[float, float, float]:
    """(loss, clip fraction, d loss / d log π) for one token with log(π/π_old) = ``log_ratio``."""
    logprobs = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, clip_fraction = rl.clipped_policy_loss(
        logprobs=logprobs,
        old_logprobs=torch.zeros(1, 1, dtype=torch.float64),
        advantages=torch.tensor([[advantage]], dtype=torch.float64),
        mask=torch.ones(1, 1, dtype=torch.float64),
        clip_range=clip_range,
    )
    loss.backward()  # type: ignore[no-untyped-call]
    assert logprobs.grad is not None
    return loss.item(), clip_fraction.item(), logprobs.grad.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped", "grad"),
    [
        # Inside the trust region: the plain surrogate -A·rho, gradient -A·rho (drho/dlogπ = rho).
        (1.1, 1.0, -1.1, 0.0, -1.1),
        (0.9, -1.0, 0.9, 0.0, 0.9),
        # Past the boundary in the direction the advantage favours: clipped, constant, no gradient.
        (1.3, 1.0, -1.2, 1.0, 0.0),
        (0.7, -1.0, 0.8, 1.0, 0.0),
        # Past the boundary the other way: the pessimistic unclipped term still pulls back.
        (1.3, -1.0, 1.3, 0.0, 1.3),
        (0.7, 1.0, -0.7, 0.0, -0.7),
        (1.5, -2.0, 3.0, 0.0, 3.0),
    ],
)
def test_clipped_policy_loss_cases(
    ratio: float, advantage: float, loss: float, clipped: float, grad: float
) -> None:
    got_loss, got_clipped, got_grad = _policy_loss_case(math.log(ratio), advantage)
    assert got_loss == pytest.approx(loss)
    assert got_clipped == clipped
    assert got_grad == pytest.approx(grad)


@pytest.mark.parametrize(
    ("log_ratio", "upper", "advantage"), [(0.18, True, 1.0), (-0.22, False, -1.0), (0.18, True, -1.0)]
)
def test_clipped_policy_loss_at_exact_boundary_equals_surrogate_and_is_not_counted_clipped(
    log_ratio: float, upper: bool, advantage: float
) -> None:
    # ε is set so that the ratio torch computes sits exactly on 1 ± ε (r - 1 and 1 - r are exact in floats).
    ratio = torch.exp(torch.tensor(log_ratio, dtype=torch.float64)).item()
    clip_range = ratio - 1.0 if upper else 1.0 - ratio
    got_loss, got_clipped, _ = _policy_loss_case(log_ratio, advantage, clip_range)
    assert got_loss == pytest.approx(-advantage * ratio)
    assert got_clipped == 0.0


def test_clipped_policy_loss_ignores_padding() -> None:
    loss, clip_fraction = rl.clipped_policy_loss(
        logprobs=torch.tensor([[0.0, 5.0]]),
        old_logprobs=torch.zeros(1, 2),
        advantages=torch.tensor([[2.0, 100.0]]),
        mask=torch.tensor([[1.0, 0.0]]),
        clip_range=0.2,
    )
    assert loss.item() == pytest.approx(-2.0)
    assert clip_fraction.item() == 0.0


def test_clipped_value_loss_hand_values() -> None:
    # V_old = 1.0, V = 1.5, R = 2.0, ε = 0.2: V_clip = 1.2, errors 0.25 and 0.64 -> ½·0.64 = 0.32, clipped.
    values = torch.tensor([[1.5, 3.0]], requires_grad=True)
    loss, clip_fraction = rl.clipped_value_loss(
        values=values,
        old_values=torch.tensor([[1.0, 3.0]]),
        returns=torch.tensor([[2.0, 3.5]]),
        mask=torch.tensor([[1.0, 1.0]]),
        clip_range=0.2,
    )
    # Second token: V = V_old = 3.0, error 0.25 both ways -> mean(0.64, 0.25)/2.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)
    loss.backward()  # type: ignore[no-untyped-call]
    assert values.grad is not None
    # The clipped first token gives no gradient; the second gives ½·2·(3.0 - 3.5)/2 = -0.25.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.25]]))


def test_whiten_masked_entries_and_padding_stays_zero() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = rl.whiten(values, mask)
    # mean 2, unbiased std 1 -> [-1, 0, 1]
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    kept_mean = rl.whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept_mean, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        rl.whiten(values, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_entropy_uniform_and_peaked() -> None:
    uniform = torch.zeros(1, 1, 4)
    assert rl.masked_entropy(uniform, torch.ones(1, 1)).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[100.0, 0.0, 0.0, 0.0]]])
    assert rl.masked_entropy(peaked, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_kl_sums_real_tokens() -> None:
    kl = rl.sequence_kl(
        torch.tensor([[-1.0, -1.0, -3.0]]), torch.tensor([[-2.0, -1.5, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    )
    torch.testing.assert_close(kl, torch.tensor([1.5]))


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # error 1.0 clipped to +0.2
        (3.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # error -0.5 clipped to -0.2
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # error +0.1
        (6.0, 0.1),
    ],
)
def test_adaptive_kl_controller(current_kl: float, expected: float) -> None:
    controller = rl.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    updated = controller.update(current_kl=current_kl, n_steps=256)
    assert updated.value == pytest.approx(expected)
    assert controller.value == 0.1  # frozen: the update returns a new controller
    assert rl.kl_controller_from_state(updated.state_dict()) == updated


def test_fixed_kl_controller_and_factory_errors() -> None:
    fixed = rl.make_kl_controller(init_kl_coef=0.05, target_kl=None, horizon=10000)
    assert fixed.update(current_kl=100.0, n_steps=64).value == 0.05
    assert rl.kl_controller_from_state(fixed.state_dict()) == fixed
    assert isinstance(
        rl.make_kl_controller(init_kl_coef=0.05, target_kl=6.0, horizon=100), rl.AdaptiveKLController
    )
    with pytest.raises(ValueError, match="init_kl_coef"):
        rl.make_kl_controller(init_kl_coef=-1.0, target_kl=None, horizon=1)
    with pytest.raises(ValueError, match="target"):
        rl.AdaptiveKLController(value=0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="unknown kind 'x'"):
        rl.kl_controller_from_state({"kind": "x"})
