"""Our DPO-family losses against TRL 1.12.0's DPOTrainer on the very same batch: values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubealign_jobs import model as models
from kubealign_jobs.losses import dpo_loss
from tests.jobs.trainer_toys import preference_rows, save_tiny_lm

trl = pytest.importorskip("trl")


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
