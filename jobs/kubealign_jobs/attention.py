"""SDPA attention with a broadcast-built mask: the same masks transformers builds, without vmap.

With left-padded prompts every forward pass needs a 4-D padding-aware causal mask. transformers
4.57 builds it by ``torch.vmap`` over a Python mask function, which costs milliseconds of
interpreter time per call whatever the tensor sizes: on small models and in the token-by-token
loop of generation that is most of the step. Every transformers mask function (causal, sliding
window, padding, their ``and``/``or`` combinations) is elementwise in its four index
arguments, so evaluating it once on broadcast index tensors ``(B,1,1,1)``, ``(1,1,1,1)``,
``(1,1,Q,1)``, ``(1,1,1,K)`` gives the identical boolean mask in a handful of tensor ops.

`use_fast_masks(model)` switches a loaded model to the ``kubealign_sdpa`` implementation:
transformers' own SDPA attention kernel with this mask builder. Nothing is saved with the
model (``_attn_implementation`` is not serialised), so artifacts stay plain transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    _ignore_causal_mask_sdpa,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)

IMPLEMENTATION = "kubealign_sdpa"


def broadcast_sdpa_mask(
    *,
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> torch.Tensor | None:
    """(B, 1, Q, K) boolean mask, True where a query attends to a key; None when SDPA's is_causal suffices.

    The arguments (transformers passes them by keyword) and the result are those of
    transformers' ``sdpa_mask``.
    """
    del kwargs
    q_length = cache_position.shape[0]
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and _ignore_causal_mask_sdpa(
        padding_mask, q_length, kv_length, kv_offset, local_size
    ):
        return None
    if padding_mask is not None:
        mask_function = and_masks(mask_function, padding_mask_function(padding_mask))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    query = cache_position.view(1, 1, -1, 1)
    key = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
    mask: torch.Tensor = mask_function(batch, head, query, key)
    return mask.expand(batch_size, 1, q_length, kv_length)


AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, broadcast_sdpa_mask)


def use_fast_masks(model: Any) -> Any:
    """Switch ``model`` (and its submodules) to `broadcast_sdpa_mask` when it runs on SDPA; returns it."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(IMPLEMENTATION)
    return model
