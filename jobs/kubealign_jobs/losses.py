"""The preference losses of the DPO paper (Rafailov et al. 2023), tensors in, tensors out.

- DPO: ``-log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])``
- Bradley-Terry reward model: ``-log sigmoid(r(x, y_w) - r(x, y_l))``
- Plackett-Luce over a ranking y_1 > ... > y_K: ``-sum_k log(exp r_k / sum_{j >= k} exp r_j)``

Log-probabilities are sequence sums over completion tokens (see `kubealign_jobs.model.sequence_logps`).
All losses use ``logsigmoid``/``logsumexp`` so they stay finite for any score magnitude.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses (B,) and the implicit rewards of the chosen and rejected answers.

    The implicit reward of an answer is ``beta * (log pi(y|x) - log ref(y|x))``; it is returned
    detached, for logging (reward accuracy and margin), never for gradients.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -functional.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


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
