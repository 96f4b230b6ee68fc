"""Preference losses, tensors in, tensors out: the DPO family, SimPO, KTO, and reward-model losses.

With ``Δ = (log π(y_w|x) - log ref(y_w|x)) - (log π(y_l|x) - log ref(y_l|x))``:

- DPO, ``sigmoid`` (Rafailov et al. 2023): ``-log sigmoid(βΔ)``; with ``label_smoothing`` ε > 0 the
  conservative DPO of Mitchell (2023), ``-(1-ε) log sigmoid(βΔ) - ε log sigmoid(-βΔ)``;
- ``robust`` (Chowdhury et al. 2024), unbiased under labels flipped with probability ε:
  ``[-(1-ε) log sigmoid(βΔ) + ε log sigmoid(-βΔ)] / (1 - 2ε)``;
- ``ipo`` (Azar et al. 2023): ``(Δ - 1/(2β))²``, each log-ratio averaged over its completion's
  tokens when ``lengths`` are given (as TRL does, with the IPO authors' agreement);
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - βΔ)``;
- SimPO (Meng et al. 2024), reference-free on length-averaged log-probs:
  ``-log sigmoid(β(avg log π(y_w) - avg log π(y_l)) - gamma)``;
- KTO (Ethayarajh et al. 2024), unpaired: ``w_d (1 - sigmoid(β(r - z)))`` for a desirable answer and
  ``w_u (1 - sigmoid(β(z - r)))`` for an undesirable one, with ``r`` its log-ratio and ``z`` the
  batch's KL estimate (clamped at 0, no gradient);
- Bradley-Terry reward model: ``-log sigmoid(r(x, y_w) - r(x, y_l))``;
- Plackett-Luce over a ranking y_1 > ... > y_K: ``-Σ_k log(exp r_k / Σ_{j >= k} exp r_j)``.

Log-probabilities are sequence sums over completion tokens (see `kubealign_jobs.model.sequence_logps`)
unless a name says ``avg``. Every loss uses ``logsigmoid``/``logsumexp`` where it can, so it
stays finite for any score magnitude. Each equals TRL's formula for the same loss type
(tests/jobs/test_loss_family.py).
"""

from __future__ import annotations

from typing import Final

import torch
from torch.nn import functional

DPO_LOSS_TYPES: Final = ("sigmoid", "robust", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses (B,) of one DPO-family ``loss_type``, and the implicit rewards of the
    chosen and rejected answers.

    The implicit reward of an answer is ``beta * (log pi(y|x) - log ref(y|x))``; it is returned
    detached, for logging (reward accuracy and margin), never for gradients. ``lengths``
    (completion token counts of chosen and rejected) is used by ``ipo`` only.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * functional.logsigmoid(
            beta * delta
        ) - label_smoothing * functional.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: robust DPO needs 0 <= ε < 0.5, got {label_smoothing}")
        clean = -(1 - label_smoothing) * functional.logsigmoid(beta * delta)
        flipped = -label_smoothing * functional.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        if lengths is not None:
            chosen_tokens, rejected_tokens = (n.clamp(min=1).to(delta.dtype) for n in lengths)
            delta = chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SimPO losses (B,) and the rewards ``beta * avg log pi`` (detached).

    No reference: the reward of an answer is its length-normalised log-probability, and ``gamma``
    is the target margin between chosen and rejected rewards.
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    losses = -functional.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (B,) of unpaired answers and their implicit rewards (detached).

    ``desirable`` (B, bool) labels each answer; ``kl_estimate`` is the reference point z, an
    estimate of KL(pi || ref) over the batch (KTO uses mismatched prompt-answer pairs); it is
    clamped at 0 and carries no gradient.
    """
    logratios = policy_logps - ref_logps
    z = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    losses = torch.where(desirable.bool(), good, bad)
    return losses, beta * logratios.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over the batch."""
    return -functional.logsigmoid(chosen_scores - rejected_scores).mean()


def plackett_luce_losses(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example Plackett-Luce negative log-likelihoods (B,) of rankings given best first.

    ``scores`` is (B, K): ``scores[b, 0]`` is the score of the preferred answer. ``valid``
    (B, K, bool) allows rankings shorter than K: each row's valid entries must come first.
    The loss is ``sum_k [logsumexp(s_k, ..., s_K) - s_k]``; the last term is always zero.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores: expected shape (B, K>=2), got {tuple(scores.shape)}")
    scores = scores.float()
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    # A large finite negative (not -inf) keeps logcumsumexp and its gradient NaN-free.
    masked = scores.masked_fill(~valid, torch.finfo(scores.dtype).min / 4)
    suffix_logsumexp = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)  # (B, K): logsumexp(s_k..s_K)
    terms = torch.where(valid, suffix_logsumexp - masked, torch.zeros_like(masked))
    return terms.sum(dim=-1)


def plackett_luce_loss(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Plackett-Luce loss over the batch; for K = 2 it equals `bradley_terry_loss`."""
    return plackett_luce_losses(scores, valid).mean()


def ranking_agreement(
    scores: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many ordered pairs (i better than j) the scores rank correctly, and how many pairs there are.

    For preference pairs this is the usual accuracy ``r_chosen > r_rejected``.
    """
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    k = scores.shape[1]
    better_first = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)  # i < j
    pair_valid = valid.unsqueeze(2) & valid.unsqueeze(1) & better_first  # (B, K, K)
    correct = (scores.unsqueeze(2) > scores.unsqueeze(1)) & pair_valid
    return correct.sum(), pair_valid.sum()
