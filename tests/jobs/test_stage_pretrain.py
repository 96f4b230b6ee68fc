"""The pretrain stage end to end through moto S3: tokenizer training, packing, resume, transformers reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubealign_jobs import storage
from tests.jobs.trainer_toys import TINY_LLAMA, run_stage, sentences, stage_config

pytestmark = pytest.mark.s3

HYPER = {
    "max_steps": 16,
    "batch_size": 8,
    "block_size": 32,
    "vocab_size": 320,
    "learning_rate": 1e-2,
    "warmup_steps": 2,
    "log_every": 4,
    "checkpoint_every": 8,
    "model": TINY_LLAMA,
}


@pytest.mark.slow
def test_pretrain_from_scratch_trains_tokenizer_and_model(bucket: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage.write_text(f"s3://{bucket}/corpus/a.txt", "\n".join(sentences(300)) + "\n")
    storage.write_text(f"s3://{bucket}/corpus/b.txt", "\n".join(sentences(100, seed=1)) + "\n")
    storage.write_text(f"s3://{bucket}/heldout.txt", "\n".join(sentences(40, seed=2)) + "\n")
    inputs = {"data": f"s3://{bucket}/corpus", "eval_data": f"s3://{bucket}/heldout.txt"}
    output = f"s3://{bucket}/ns/run/pretrain"
    config = stage_config(
        tmp_path, stage_type="pretrain", output=output, inputs=inputs, hyperparameters=HYPER
    )
    run = run_stage("pretrain", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.events("model")[0]["vocab_size"] == 320
    losses = [r["loss"] for r in run.steps]
    assert losses[-1] < losses[0] - 1.0  # a templated corpus is quickly learnt
    assert run.termination is not None and run.termination["eval_perplexity"] < 320 / 4

    local = storage.fetch_dir(f"{output}/artifact", tmp_path / "artifact")
    lm = AutoModelForCausalLM.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))  # type: ignore[no-untyped-call]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
    )
    prompt = tokenizer("<|bos|>The movie was", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = lm.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert isinstance(out, torch.Tensor)  # generate() returns bare ids without return_dict_in_generate
    assert out.shape[1] == prompt.input_ids.shape[1] + 5

    # Continue from the step-16 checkpoint with a longer budget: the tokenizer comes back with
    # the checkpoint (it is not retrained) and the step count continues.
    storage.delete_prefix(f"{output}/artifact")
    longer = stage_config(
        tmp_path,
        stage_type="pretrain",
        output=output,
        inputs=inputs,
        hyperparameters={**HYPER, "max_steps": 20},
    )
    resumed = run_stage("pretrain", longer, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] == 16
    assert [r["step"] for r in resumed.steps] == [20]
    again_dir = storage.fetch_dir(f"{output}/artifact", tmp_path / "again")
    again = AutoTokenizer.from_pretrained(str(again_dir))  # type: ignore[no-untyped-call]
    assert again.get_vocab() == tokenizer.get_vocab()


def test_pretrain_bad_model_spec_is_named(bucket: str, tmp_path: Path) -> None:
    storage.write_text(f"s3://{bucket}/corpus.txt", "\n".join(sentences(50)) + "\n")
    config = stage_config(
        tmp_path,
        stage_type="pretrain",
        output=f"s3://{bucket}/out",
        inputs={"data": f"s3://{bucket}/corpus.txt"},
        hyperparameters={**HYPER, "model": {"arch": "no-such-arch"}},
    )
    run = run_stage("pretrain", config, tmp_path)
    assert run.returncode == 2
    assert "hyperparameters.model: cannot build 'no-such-arch'" in run.stderr


def test_document_positions_restart_at_every_bos() -> None:
    from kubealign_jobs.pretrain import document_positions

    bos = 1
    blocks = torch.tensor([[7, 8, 1, 5, 6, 9, 1, 4], [1, 3, 3, 3, 1, 2, 2, 2]])
    assert document_positions(blocks, bos).tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]]


def test_document_attention_scores_each_document_as_if_alone() -> None:
    """With it, a packed block's log-probs are the documents' own; without it, later ones see earlier ones."""
    from kubealign_jobs import model as models
    from kubealign_jobs.pretrain import causal_lm_loss

    tokenizer = models.train_tokenizer(sentences(100), vocab_size=300)
    torch.manual_seed(0)
    lm = models.build_causal_lm(dict(TINY_LLAMA), tokenizer=tokenizer).double().eval()  # type: ignore[no-untyped-call]
    docs = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for t in ("the movie was good", "a dull plot")
    ]

    def nll(tokens: list[int], **kwargs: int) -> float:
        return float(causal_lm_loss(lm, torch.tensor([tokens]), **kwargs).loss_sum.detach())

    # The block also predicts the second document's bos from the first document: that term aside,
    # each document is scored as if it were alone.
    alone = nll(docs[0] + docs[1][:1]) + nll(docs[1])
    assert nll(docs[0] + docs[1], start_token=tokenizer.bos_token_id) == pytest.approx(alone, abs=1e-8)
    assert nll(docs[0] + docs[1]) != pytest.approx(alone, abs=1e-4)


def test_pretrain_trains_with_document_attention(bucket: str, tmp_path: Path) -> None:
    storage.write_text(f"s3://{bucket}/corpus.txt", "\n".join(sentences(200)) + "\n")
    config = stage_config(
        tmp_path,
        stage_type="pretrain",
        output=f"s3://{bucket}/ns/run/pretrain-docs",
        inputs={"data": f"s3://{bucket}/corpus.txt", "eval_data": f"s3://{bucket}/corpus.txt"},
        hyperparameters={**HYPER, "max_steps": 4, "checkpoint_every": 0, "document_attention": True},
    )
    run = run_stage("pretrain", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.termination is not None and run.termination["eval_loss"] > 0
