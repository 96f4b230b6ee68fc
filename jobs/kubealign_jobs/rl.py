"""PPO for language models, the math only: pure torch tensors in and out, no I/O, no models.

Shapes follow one convention throughout: ``(B, T)`` tensors are indexed by the batch row and
the completion position, and ``mask`` is 1.0 on real completion tokens and 0.0 on padding.
Everything here is what Ziegler et al. (2019) and Stiennon et al. (2020) describe for RLHF:

- the reward the policy maximises is ``r(x, y) - β·KL(π‖π_ref)``; the KL term is paid per
  token, ``r_t = -β·(log π(y_t) - log π_ref(y_t))``, and the sequence reward ``r(x, y)`` is
  added at the last completion token;
- advantages come from generalised advantage estimation (Schulman et al., 2016) and are
  whitened over the batch;
- the policy loss is PPO-clip, the value loss is clipped around the rollout's values;
- β is fixed or adapted towards a target KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set (over ``dim``, or everything)."""
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set; an all-padding row counts as zero, not NaN."""
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(values, mask, dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``values`` over the masked entries (Bessel's correction)."""
    count = mask.sum()
    if count < 2:
        raise ValueError(f"masked_var: needs at least 2 unmasked entries, got {int(count.item())}")
    mean = masked_mean(values, mask)
    centred = (values - mean) * mask
    return (centred**2).sum() / (count - 1)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Normalise the masked entries to unit variance (and zero mean); padding stays zero.

    ``shift_mean=False`` keeps the mean: rewards are scaled but not centred, since centring
    a reward changes which completions the policy is pushed towards.
    """
    mean = masked_mean(values, mask)
    scaled = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    if not shift_mean:
        scaled = scaled + mean
    return scaled * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy ``H = logsumexp(z) - Σ softmax(z)·z`` of (B, T, V) logits -> (B, T)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over the real completion tokens."""
    return masked_mean(entropy_from_logits(logits), mask)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π (Schulman's k1/k2/k3).

    With ``log_ratio = log π - log π_ref``: k1 = log_ratio (unbiased, can be negative),
    k2 = ½·log_ratio² (biased, low variance), k3 = (e^{-log_ratio} - 1) + log_ratio
    (unbiased and never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator: {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of ``mask`` (B, T) -> (B,), 0 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values


def kl_penalized_rewards(
    *,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -β·kl_t`` plus the sequence score at the last completion token.

    ``scores`` is (B,); the rest are (B, T). Returns ``(rewards, kl)``, both (B, T) and zero
    on padding, where ``kl`` is the unscaled per-token estimate (summed per row, it is the
    sequence KL the metrics report).
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator=estimator) * mask
    rewards = -beta * kl
    last = last_token_index(mask)
    has_tokens = (mask.sum(dim=1) > 0).to(rewards.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last), rewards[rows, last] + scores.to(rewards.dtype) * has_tokens)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) tensors -> ``(advantages, returns)``.

    ``δ_t = r_t + gamma·V_{t+1} - V_t`` and ``A_t = δ_t + gamma·lambda·A_{t+1}``, where "t+1" is the next
    *real* token of the row: padding (anywhere, left, right or in between) is skipped, so it
    neither receives an advantage nor leaks a value into its neighbours, and the value after
    the last real token is 0 (the episode ends there). ``returns = A + V`` on real tokens.
    """
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        real = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, advantage, torch.zeros_like(advantage))
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip: ``mean(max(-A·rho, -A·clip(rho, 1-ε, 1+ε)))`` with ``rho = π/π_old`` per token.

    Returns ``(loss, clip_fraction)``. Where the clipped term is the larger one the loss is
    constant in the policy, so a token whose ratio left the trust region in the direction
    its advantage favours contributes no gradient.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clip_fraction.detach()


def clipped_value_loss(
    *,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``½·mean(max((V - R)², (V_clip - R)²))`` with ``V_clip = V_old + clip(V - V_old, ±ε)``.

    Returns ``(loss, clip_fraction)``: a value estimate may not jump further than ``ε`` from
    the rollout's value in one update when that jump would lower the loss.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clip_fraction.detach()


@dataclass(frozen=True)
class FixedKLController:
    """A constant KL coefficient β."""

    value: float

    def update(self, *, current_kl: float, n_steps: int) -> FixedKLController:
        del current_kl, n_steps
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}


@dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. (2019): β follows a proportional controller towards a target KL.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``β ← β·(1 + e·n_steps / horizon)``: β grows
    when the policy drifts further than the target from the reference and shrinks when it
    stays closer, at a rate set by the horizon (in samples).
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"adaptive KL controller: target ({self.target}) and horizon ({self.horizon}) must be > 0"
            )

    def update(self, *, current_kl: float, n_steps: int) -> AdaptiveKLController:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        return replace(self, value=self.value * (1.0 + proportional_error * n_steps / self.horizon))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}


KLController = FixedKLController | AdaptiveKLController


def kl_controller_from_state(state: dict[str, Any]) -> KLController:
    """Rebuild a controller saved with ``state_dict()`` (a checkpoint's KL state)."""
    kind = state.get("kind")
    if kind == "fixed":
        return FixedKLController(value=float(state["value"]))
    if kind == "adaptive":
        return AdaptiveKLController(
            value=float(state["value"]), target=float(state["target"]), horizon=int(state["horizon"])
        )
    raise ValueError(f"KL controller state: unknown kind {kind!r} (expected 'fixed' or 'adaptive')")


def make_kl_controller(*, init_kl_coef: float, target_kl: float | None, horizon: int) -> KLController:
    """Adaptive when a target KL is given, fixed otherwise."""
    if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
        raise ValueError(f"init_kl_coef: must be a finite number >= 0, got {init_kl_coef}")
    if target_kl is None:
        return FixedKLController(value=init_kl_coef)
    return AdaptiveKLController(value=init_kl_coef, target=target_kl, horizon=horizon)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Monte Carlo sequence KL per row: ``Σ_t (log π - log π_ref)`` over real tokens -> (B,)."""
    return masked_sum(logprobs - ref_logprobs, mask, dim=1)


ADVANTAGES = ("grpo", "rloo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, method: str = "grpo", scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Per-completion advantages (N,) from rewards (N,) laid out as consecutive groups of one prompt.

    - ``grpo`` (Shao et al. 2024): reward minus its group's mean;
    - ``rloo`` (Ahmadian et al. 2024): reward minus the mean of the *other* G - 1 rewards of its
      group, ``G / (G - 1)`` times the grpo advantage, an unbiased baseline;

    each divided by the group's standard deviation (plus ``eps``) when ``scale``. A group whose
    rewards are all equal teaches nothing: its advantages are exactly 0, never NaN.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size: {rewards.numel()} rewards do not form groups of {group_size} >= 2")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if method == "rloo":
        # r - (sum - r) / (G - 1), written so that rounding cannot tell equal rewards apart.
        advantages = advantages * (group_size / (group_size - 1))
    elif method != "grpo":
        raise ValueError(f"advantage: {method!r} is not one of {', '.join(ADVANTAGES)}")
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    # A float mean of equal rewards can be off by one ulp, which the division by a zero std
    # would blow up: equal rewards give exactly zero.
    equal = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return advantages.masked_fill(equal, 0.0).reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective, to minimise: per token the clipped surrogate ``-min(rho A, clip(rho) A)`` plus
    ``kl_coef`` times the k3 KL estimate to the reference, averaged over each completion's
    tokens, then over completions (Shao et al. 2024, eq. 3).

    ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``mask`` are (B, C); ``advantages`` (B,).
    Returns the loss and detached statistics (clip fraction, KL).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(1)
    surrogate = torch.minimum(
        ratio * advantage, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * advantage
    )
    per_token = -surrogate
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None and kl_coef:
        kl = kl_estimate(logprobs, ref_logprobs, estimator="k3")
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip_range).float()
    stats["clip_fraction"] = masked_mean(clipped.detach(), mask)
    return loss, stats
