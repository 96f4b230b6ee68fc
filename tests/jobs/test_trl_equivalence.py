"""Our DPO-family and KTO losses against TRL 1.16's DPOTrainer and KTOTrainer on the very same batch.

TRL 1.16 computes per-token log-probs with a chunked float32 LM-head kernel (``add_fused_lm_head``),
whatever the model's dtype: measured on these toys it is off the exact float64 log-probs by up to
2.5e-3 nats per sequence. So each test compares twice: TRL's trainer as it ships, end to end, within
that kernel's error; and TRL's own loss code fed exact float64 log-probs (`exact_lm_head`), where
values agree to 1e-6 and gradients to 1e-9: the formulas, not the kernels.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from kubealign_jobs import model as models
from kubealign_jobs.losses import dpo_loss
from tests.jobs.trainer_toys import preference_rows, save_tiny_lm

trl = pytest.importorskip("trl")

# TRL's float32 LM-head kernel against exact log-probs, per sequence on these toys (measured 2.5e-3).
TRL_KERNEL_LOSS_TOLERANCE = 1e-3


def exact_lm_head(model: Any) -> None:
    """Make ``model(..., labels=, fused_lm_head=True)`` (the call TRL's trainers make) return exact
    per-token log-probs in the model's dtype, from full logits, instead of TRL's float32 kernel."""
    forward = type(model).forward

    def fused(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return forward(self, *args, labels=labels, **kwargs)
        logits = forward(self, *args, **kwargs).logits[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return types.SimpleNamespace(
            log_probs=chosen.masked_fill(~mask, 0),
            entropy=-(logp.exp() * logp).sum(-1).masked_fill(~mask, 0),
            mean_logits=logits.mean(-1).masked_fill(~mask, 0),
            is_top1=(logits.argmax(-1) == targets) & mask,
            log_sum_sq_probs=torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0),
            aux_loss=None,
        )

    model.forward = types.MethodType(fused, model)


@pytest.mark.parametrize(
    ("beta", "loss_type", "label_smoothing"),
    [
        (0.1, "sigmoid", 0.0),
        (0.5, "sigmoid", 0.0),
        (0.1, "robust", 0.2),
        (0.1, "ipo", 0.0),
        (0.5, "hinge", 0.0),
    ],
)
def test_dpo_loss_matches_trl_dpo_trainer(
    tmp_path: Path, beta: float, loss_type: str, label_smoothing: float
) -> None:
    from datasets import Dataset

    model_dir = save_tiny_lm(tmp_path / "model")
    tokenizer = models.load_tokenizer(model_dir)
    # float64, so that the comparison measures the formulas, not float32 summation order.
    policy = models.load_causal_lm(model_dir).double()
    reference = models.load_causal_lm(model_dir).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference that differs from the policy, so every term matters
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=8,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(preference_rows(8)),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    shipped_loss = trainer.compute_loss(policy, batch)
    exact_lm_head(policy)
    exact_lm_head(reference)
    trl_loss = trainer.compute_loss(policy, batch)
    trl_grads = torch.autograd.grad(trl_loss, list(policy.parameters()))

    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    # The path the dpo stage trains through: LM head on completion positions only.
    policy_chosen, policy_rejected = models.sequence_logps(
        models.CompletionLogps(policy), ids, mask, completion
    ).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = models.sequence_logps(reference, ids, mask, completion).chunk(2)
    chosen_tokens, rejected_tokens = completion.sum(dim=1).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        lengths=(chosen_tokens, rejected_tokens),
    )
    ours = losses.mean()
    our_grads = torch.autograd.grad(ours, list(policy.parameters()))

    assert abs(ours.item() - trl_loss.item()) < 1e-6
    assert abs(ours.item() - shipped_loss.item()) < TRL_KERNEL_LOSS_TOLERANCE
    assert abs(ours.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # a non-trivial batch
    assert any(g.abs().sum() > 0 for g in our_grads)
    for ours_g, theirs_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, theirs_g, rtol=1e-9, atol=1e-12)
    logged = trainer._metrics["train" if policy.training else "eval"]
    assert (chosen_rewards > rejected_rewards).float().mean().item() == pytest.approx(
        logged["rewards/accuracies"][-1]
    )
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(
        logged["rewards/margins"][-1], abs=1e-6
    )


@pytest.mark.parametrize(
    ("beta", "desirable_weight", "undesirable_weight"), [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)]
)
def test_kto_batch_loss_matches_trl_kto_trainer(
    tmp_path: Path, beta: float, desirable_weight: float, undesirable_weight: float
) -> None:
    """The kto stage's batch loss (its KL reference point included) against TRL's KTOTrainer on
    TRL's own batch: the rows' sequences and TRL's mismatched ones (completions rotated by one)."""
    from datasets import Dataset

    from kubealign_jobs import data, dpo, kto
    from kubealign_jobs.stages import KTOHyperparameters

    model_dir = save_tiny_lm(tmp_path / "model")
    tokenizer = models.load_tokenizer(model_dir)
    policy = models.load_causal_lm(model_dir).double()
    reference = models.load_causal_lm(model_dir).double()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    pairs = preference_rows(4, seed=3)
    rows = [
        {"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
        for pair in pairs
        for key in ("chosen", "rejected")
    ]
    args = trl.KTOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(rows),
    )
    trainer = trl.KTOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    shipped_loss = trainer.compute_loss(policy, batch)
    exact_lm_head(policy)
    exact_lm_head(reference)
    trl_loss = trainer.compute_loss(policy, batch)
    trl_grads = torch.autograd.grad(trl_loss, list(policy.parameters()))

    # Both sequence sets as the kto stage lays them out: the rows' own, then their mismatched ones.
    own = data.CompletionBatch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mismatched = data.CompletionBatch(
        batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    )
    width = max(own.input_ids.shape[1], mismatched.input_ids.shape[1])

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    pad = int(tokenizer.pad_token_id)
    sequences = data.CompletionBatch(
        torch.cat([widen(own.input_ids, pad), widen(mismatched.input_ids, pad)]),
        torch.cat([widen(own.attention_mask, 0), widen(mismatched.attention_mask, 0)]),
        torch.cat([widen(own.completion_mask, 0), widen(mismatched.completion_mask, 0)]),
    )
    with torch.no_grad():
        ref_own, ref_mismatched = models.sequence_logps(
            reference, sequences.input_ids, sequences.attention_mask, sequences.completion_mask
        ).chunk(2)
    kto_batch = kto.KTOBatch(dpo.PairBatch(sequences, ref_own, ref_mismatched), batch["label"].bool())
    hp = KTOHyperparameters(
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )
    output = kto.batch_loss(models.CompletionLogps(policy), kto_batch, hp=hp)
    ours = output.loss_sum / len(rows)
    our_grads = torch.autograd.grad(ours, list(policy.parameters()))

    assert abs(ours.item() - trl_loss.item()) < 1e-6
    assert abs(ours.item() - shipped_loss.item()) < TRL_KERNEL_LOSS_TOLERANCE
    assert abs(ours.item() - 0.5 * (desirable_weight + undesirable_weight) / 2) > 1e-3  # non-trivial
    logged = trainer._metrics["train" if policy.training else "eval"]
    assert output.metric_sums["kl"].item() / len(rows) == pytest.approx(logged["kl"][-1], abs=1e-9)
    assert logged["kl"][-1] > 0  # the reference point is in play, not clamped away
    for ours_g, theirs_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, theirs_g, rtol=1e-9, atol=1e-12)
