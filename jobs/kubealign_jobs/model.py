"""Models and tokenizers: load a save_pretrained folder, build a new one from a config, score sequences.

Everything here works offline. A model is always a *local directory* (fetched from storage
first; a ``.gguf`` file is converted into one by `gguf_to_pretrained`); a string that is not
an existing directory is refused rather than passed to transformers, where it would be taken
for a hub name and trigger a download attempt.

Shared by every stage:

- `sequence_logps` / `token_logps`: log-probabilities of the completion tokens under a causal
  LM (dpo, ppo and evaluate all need them).
- `reward_scores`: the scalar score of a reward model (AutoModelForSequenceClassification
  with one label, as plain transformers loads it).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Causal LMs take no token_type_ids; a tokenizer that returns them breaks ``model(**tokenizer(text))``.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]

# Short names for the architectures people build tiny test models from; any other
# transformers model_type works too (``{"arch": "mistral", ...}``).
_ARCH_ALIASES = {"gpt-2": "gpt2", "llama2": "llama"}


class ModelError(ValueError):
    """A model or tokenizer cannot be loaded or built; the message says which and why."""


# ---------------------------------------------------------------------------- tokenizers


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) with pad/bos/eos special tokens.

    Byte-level means every string is encodable (no unknown token), which matters for
    corpora we have never seen.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 259:  # 256 bytes + 3 special tokens
        raise ModelError(f"vocab_size: {vocab_size} is too small for a byte-level tokenizer (minimum 259)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="right",
        model_input_names=MODEL_INPUT_NAMES,
    )


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer trained by `train_tokenizer` from its ``tokenizers`` JSON (for broadcasting)."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(text),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="right",
        model_input_names=MODEL_INPUT_NAMES,
    )


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model; a pad token is added (as eos) when the tokenizer has none."""
    _require_dir(path, what="tokenizer")
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            str(path), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no loadable tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------------------- models


def build_causal_lm(spec: dict[str, Any], *, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM from ``{"arch": "llama", "hidden_size": 64, ...}``.

    Every key except ``arch`` is passed to the architecture's config class; the vocabulary
    size and special-token ids come from ``tokenizer`` so the two always agree.
    """
    fields = dict(spec)
    arch = str(fields.pop("arch", "llama")).lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    try:
        config = AutoConfig.for_model(arch, **fields)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"hyperparameters.model: cannot build {arch!r}: {exc}") from exc
    if int(config.vocab_size) < len(tokenizer):
        raise ModelError(
            f"hyperparameters.model.vocab_size: {config.vocab_size} is smaller than "
            f"the tokenizer's vocabulary ({len(tokenizer)})"
        )
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model


def load_causal_lm(path: Path, *, dtype: torch.dtype | None = None, empty: bool = False) -> PreTrainedModel:
    """A causal LM from a local save_pretrained folder.

    ``empty``: the architecture only, its parameters on the meta device (no memory) and its
    buffers real; a process whose shard of the weights comes from rank 0 (`parallel.shard`).
    """
    _require_dir(path, what="model")
    try:
        if empty:
            return _empty_model(AutoModelForCausalLM, path)
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype or torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a loadable causal LM ({exc})") from exc
    return model


def _empty_model(auto_class: Any, path: Path, **config_fields: Any) -> PreTrainedModel:
    """``auto_class``'s model of the folder's config, without weights (see `load_causal_lm`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, **config_fields)
    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = auto_class.from_config(config, dtype=torch.float32)
    # The context re-registers every parameter it sees, tied ones too: tie them again, so the
    # layout (one tensor or two) is the one rank 0's loaded model has.
    model.tie_weights()  # type: ignore[no-untyped-call]
    if model.can_generate() and (path / "generation_config.json").is_file():
        # Sampling defaults must match rank 0's, which loaded them with the weights.
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    return model


def load_reward_model(
    path: Path, *, tokenizer: PreTrainedTokenizerBase | None = None, empty: bool = False
) -> PreTrainedModel:
    """A reward model: a sequence classifier with one output, scoring the last non-pad token.

    ``path`` may hold a trained reward model or a causal LM; from a causal LM the backbone
    weights are reused and a new scalar head is initialised (transformers logs which).
    ``empty`` as in `load_causal_lm`.
    """
    _require_dir(path, what="reward model")
    try:
        if empty:
            model = _empty_model(AutoModelForSequenceClassification, path, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, num_labels=1, dtype=torch.float32
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load as a reward model ({exc})") from exc
    if tokenizer is not None and model.config.pad_token_id is None:
        # Sequence classifiers find the last real token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


GGUF_SUFFIX = ".gguf"


def gguf_to_pretrained(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF file (llama.cpp's format) into a save_pretrained folder at ``dest``.

    transformers reads the weights (dequantised to float32), the tokenizer and its chat
    template from the file's metadata through the ``gguf`` package. Every stage then loads an
    ordinary folder, and the artifact a stage publishes is one too. The folder appears
    atomically (written beside ``dest``, then renamed), so a conversion killed half-way is
    never taken for a model.
    """
    if not gguf.is_file():
        raise ModelError(f"model: {gguf} is not a GGUF file")
    partial_dir = dest.with_name(dest.name + ".partial")
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:  # a foreign binary format fails in many ways (struct, index, key errors...)
        raise ModelError(f"{gguf}: not a loadable GGUF model ({type(exc).__name__}: {exc})") from exc
    _apply_gguf_special_tokens(gguf, tokenizer, model)
    save_pretrained(model, tokenizer, partial_dir)
    partial_dir.replace(dest)
    return dest


# GGUF metadata key -> the tokenizer attribute it sets.
_GGUF_SPECIAL_TOKENS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def _apply_gguf_special_tokens(
    gguf: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> None:
    """Take bos, eos and pad from the file's own metadata.

    transformers 4.57 builds SmolLM2's tokenizer with eos = bos = ``<|im_start|>``, while the
    file says eos = ``<|im_end|>``: sampling would never stop at the end of an answer, and
    every training sequence would end with the wrong token.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    for key, attr in _GGUF_SPECIAL_TOKENS.items():
        field = reader.fields.get(key)
        if field is None:
            continue
        token_id = int(field.parts[field.data[0]][0])
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
        setattr(model.config, f"{attr}_id", token_id)
        setattr(model.generation_config, f"{attr}_id", token_id)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path) -> Path:
    """Write model and tokenizer as one folder that plain transformers loads."""
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return dest


def _require_dir(path: Path, *, what: str) -> None:
    if not Path(path).is_dir():
        raise ModelError(f"{what}: {path} is not a local directory (hub names are never downloaded)")


# ---------------------------------------------------------------------------- scoring


# Which model classes take transformers' ``logits_to_keep``; inspecting a signature each step is wasteful.
_LOGITS_TO_KEEP_SUPPORT: dict[type[nn.Module], bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    target: nn.Module = getattr(model, "module", model)  # a DDP wrapper forwards its kwargs to .module
    kind = type(target)
    if kind not in _LOGITS_TO_KEEP_SUPPORT:
        _LOGITS_TO_KEEP_SUPPORT[kind] = "logits_to_keep" in inspect.signature(kind.forward).parameters
    return _LOGITS_TO_KEEP_SUPPORT[kind]


def causal_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to hand the model: all ones when every row is right-padded.

    With right padding, causal attention alone already keeps every real token from seeing
    padding (padding only ever comes after it), and position ids are the same either way, so
    the outputs at real tokens do not change. An all-ones mask lets transformers skip building
    a 4-D mask (a vmap over Python functions that costs more than the whole forward pass of a
    small model) and run SDPA's causal kernel. ``None`` would not do: transformers then infers
    packed sequences from the position ids and builds the 4-D mask anyway. Left- or
    middle-padded rows keep their mask.
    """
    if attention_mask is None:
        return None
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return torch.ones_like(attention_mask)
    return attention_mask


def mask_arguments(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict[str, Any]:
    """What tells the model which tokens see which: a mask, or for packed rows the position ids.

    With ``position_ids`` restarting per sequence and no mask, transformers confines attention
    to each packed sequence (and flash attention runs its variable-length kernel).
    """
    if position_ids is not None:
        return {"attention_mask": None, "position_ids": position_ids}
    return {"attention_mask": causal_attention_mask(attention_mask)}


def completion_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Logits for the positions that predict completion tokens, and the offset of the first one.

    The LM head is the widest matrix multiply of a small model (vocab x hidden per position);
    positions before the earliest completion token in the batch predict only prompt tokens, so
    they are skipped through transformers' ``logits_to_keep`` where the model supports it.
    Returns logits (B, T - 1 - offset, V) aligned with ``input_ids[:, offset + 1:]``.
    """
    seq_len = input_ids.shape[1]
    offset = 0
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model):
        has_completion = completion_mask.any(dim=0).nonzero()
        first = int(has_completion[0]) if has_completion.numel() else seq_len - 1
        # Logit at position p predicts token p + 1: keep positions first - 1 .. seq_len - 2.
        offset = max(first - 1, 0)
        kwargs["logits_to_keep"] = seq_len - offset
    logits: torch.Tensor = model(
        input_ids=input_ids, use_cache=False, **mask_arguments(attention_mask, position_ids), **kwargs
    ).logits
    return logits[:, : seq_len - 1 - offset], offset  # (B, T-1-offset, V): the last position predicts nothing


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probs (B, T-1) of ``input_ids[:, 1:]``; zero wherever ``completion_mask[:, 1:]`` is 0.

    ``model`` is a causal LM, or a `CompletionLogps` wrapper (possibly inside DDP), which
    computes the LM head on completion positions only. ``position_ids``: a packed batch
    (`data.collate_packed`).
    """
    if isinstance(getattr(model, "module", model), CompletionLogps):
        per_token: torch.Tensor = model(input_ids, attention_mask, completion_mask, position_ids)
        return per_token
    logits, offset = completion_logits(model, input_ids, attention_mask, completion_mask, position_ids)
    labels = input_ids[:, offset + 1 :]
    per_token = logps_from_logits(logits, labels)
    mask = completion_mask[:, offset + 1 :].to(per_token.dtype)
    per_token = per_token * mask
    if offset:
        per_token = functional.pad(per_token, (offset, 0))
    return per_token


# Architectures whose logits are exactly ``lm_head(last_hidden_state)``: no soft-capping
# (Gemma 2), logit scale (Cohere) or other post-processing that the shortcut below would skip.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2"}
)


class CompletionLogps(nn.Module):
    """A causal LM that returns the log-probs of completion tokens only, for training.

    ``forward(input_ids, attention_mask, completion_mask) -> (B, T-1)`` log-probs, zero off the
    completion. The LM head (hidden x vocab per position) and the log-softmax are the largest
    costs of a preference step on a small model and the largest activations on a large one;
    here they run only on the positions that predict a completion token, never on prompt or
    padding positions. For architectures outside `PLAIN_HEAD_MODEL_TYPES` it falls back to the
    full forward. Wrap before ``accelerator.prepare`` so DDP sees one forward per step.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.head_only_on_completions = (
            getattr(lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
            and lm.get_output_embeddings() is not None  # type: ignore[no-untyped-call]
        )

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)  # type: ignore[no-untyped-call]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.head_only_on_completions:
            return token_logps(self.lm, input_ids, attention_mask, completion_mask, position_ids)
        hidden: torch.Tensor = self.lm.base_model(
            input_ids=input_ids, use_cache=False, **mask_arguments(attention_mask, position_ids)
        ).last_hidden_state  # (B, T, H)
        predicts = completion_mask[:, 1:].bool()  # (B, T-1): position t predicts completion token t + 1
        head = self.lm.get_output_embeddings()  # type: ignore[no-untyped-call]
        logits = head(hidden[:, :-1][predicts])  # (N, V) for the N completion tokens
        values = logps_from_logits(logits, input_ids[:, 1:][predicts])  # (N,)
        per_token = torch.zeros(predicts.shape, dtype=values.dtype, device=values.device)
        return per_token.masked_scatter(predicts, values)


def logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in float32 (or float64 for float64 logits).

    Cross-entropy fuses log-softmax and gather (no (B, T, V) log-prob tensor is kept for
    backward) and is stable for any logit scale.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # half-precision log-softmax loses the small log-probs
    return -functional.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def sequence_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log-probs of the completion tokens of each sequence: (B,).

    ``completion_mask`` is 1 on completion tokens (the ones whose likelihood counts) and 0 on
    prompt and padding; the prediction of token t comes from the logits at t - 1.
    """
    return token_logps(model, input_ids, attention_mask, completion_mask).sum(dim=-1)


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each sequence (B,), as transformers pools it (the last non-pad token).

    ``model`` is a sequence classifier with one label, or a `LastTokenReward` wrapper (possibly
    inside DDP), which runs the last layer on the scored token only.
    """
    if isinstance(getattr(model, "module", model), LastTokenReward):
        scores: torch.Tensor = model(input_ids, attention_mask)
        return scores
    logits: torch.Tensor = model(
        input_ids=input_ids, attention_mask=causal_attention_mask(attention_mask), use_cache=False
    ).logits
    return logits.squeeze(-1).float()


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B,) position of each row's rightmost non-pad token: the token transformers' classifiers score."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LastTokenReward(nn.Module):
    """A reward model that computes only what its score depends on, for training.

    ``forward(input_ids, attention_mask) -> (B,)`` scores, equal (up to float rounding) to
    `reward_scores` on the wrapped ``AutoModelForSequenceClassification``. That model runs
    every layer, the final norm and the scalar head on every position and then keeps one
    position per row. The score reads the last layer's output at one token only, so here
    the last layer computes keys and values for all positions but the query, attention
    output, MLP, final norm and head for the scored token alone: on a small model that is
    most of one layer's forward and backward. Llama-architecture models with SDPA attention
    and right-padded rows take this path; anything else falls back to the full forward.
    Wrap before ``accelerator.prepare`` so DDP sees one forward per step.
    """

    def __init__(self, scorer: PreTrainedModel) -> None:
        super().__init__()
        self.scorer = scorer
        config = scorer.config
        self.pad_token_id: int | None = config.pad_token_id
        self.last_layer_on_scored_token = (
            getattr(config, "model_type", None) == "llama"
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and self.pad_token_id is not None
            and isinstance(getattr(scorer, "score", None), nn.Linear)
        )

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.scorer.gradient_checkpointing_enable(**kwargs)  # type: ignore[no-untyped-call]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = causal_attention_mask(attention_mask)
        dropout = float(getattr(self.scorer.config, "attention_dropout", 0.0))
        right_padded = mask is not None and mask is not attention_mask
        if not (self.last_layer_on_scored_token and right_padded and (dropout == 0.0 or not self.training)):
            return reward_scores(self.scorer, input_ids, attention_mask)
        assert self.pad_token_id is not None  # checked in __init__
        base: Any = self.scorer.base_model
        batch, length = input_ids.shape
        hidden: torch.Tensor = base.embed_tokens(input_ids)
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        cos, sin = base.rotary_emb(hidden, position_ids)  # (1, T, head_dim)
        # No mask: with right padding, causal attention alone keeps real tokens from seeing
        # padding (see `causal_attention_mask`), and SDPA then runs its causal kernel.
        for layer in base.layers[: len(base.layers) - 1]:
            hidden = layer(
                hidden, attention_mask=None, position_ids=position_ids, position_embeddings=(cos, sin)
            )
        last = last_non_pad_index(input_ids, self.pad_token_id)  # (B,)
        rows = torch.arange(batch, device=input_ids.device)
        layer = base.layers[-1]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)  # (B, T, H): keys and values need every position
        head_dim = attn.head_dim
        keys = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, KV, T, D)
        values = attn.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
        keys = keys * cos.unsqueeze(1) + _rotate_half(keys) * sin.unsqueeze(1)
        query = attn.q_proj(normed[rows, last]).view(batch, -1, 1, head_dim)  # (B, heads, 1, D)
        cos_q, sin_q = cos[0, last].view(batch, 1, 1, head_dim), sin[0, last].view(batch, 1, 1, head_dim)
        query = query * cos_q + _rotate_half(query) * sin_q
        if attn.num_key_value_groups > 1:
            keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
            values = values.repeat_interleave(attn.num_key_value_groups, dim=1)
        visible = (position_ids <= last.unsqueeze(1)).view(batch, 1, 1, length)  # causal for the scored token
        attended = functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=visible, scale=attn.scaling
        )  # (B, heads, 1, D)
        token = hidden[rows, last] + attn.o_proj(attended.reshape(batch, -1))
        token = token + layer.mlp(layer.post_attention_layernorm(token))
        score: torch.Tensor = self.scorer.score(base.norm(token))  # type: ignore[operator]
        return score.squeeze(-1).float()


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: preference losses compare log-probs of two forward passes
    (policy vs reference, chosen vs rejected) and dropout noise would bias those differences."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
