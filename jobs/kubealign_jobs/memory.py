"""How many bytes a training stage needs per device, estimated before any weight is loaded.

Standard library only: the numbers come from a model's ``config.json`` (or a pretrain stage's
``model`` hyperparameter) and the stage's settings, so the operator can use them as well as
the trainer.

Per device, for P parameters of which T train (all of them, or the LoRA adapters):

    parameters   4 P                  fp32 master weights (/ N processes under FSDP)
                 + 2 P                bf16/fp16 copies autocast keeps during a step (DDP), or
                 + 2 x 2 L            two gathered bf16 layers in flight (FSDP, L = one layer)
    gradients    4 T                  (/ N under FSDP)
    optimizer    8 T                  AdamW's two fp32 moments (/ N under FSDP)
    activations  per token: every layer keeps ~(6 H + 4 I + 2 KV) values for backward (H the
                 hidden size, I the MLP width, KV the key/value width); with gradient
                 checkpointing only each layer's input (H) plus one layer's full set; plus the
                 fp32 logits and their gradient (2 x 4 V per token)
                 (attention scores are not stored: SDPA's fused kernels recompute them)

``cpu_offload`` moves parameters, gradients and optimizer state to host memory. The estimate
is for the largest micro-batch (``micro_batch_size x max_length`` tokens, twice that for a
preference pair); allocator fragmentation and the CUDA context (~0.5-1 GiB) come on top.

ppo adds a frozen reference (4 P, / N under FSDP; none under LoRA, whose reference is the base
with its adapters off) and, under FSDP, the whole policy gathered for sampling (4 P, or 2 P in
bf16/fp16) in place of the two layers in flight; its micro-batch is ``mini_batch_size`` rows of
``max_prompt_tokens + max_new_tokens``. ``value_model: separate`` adds a second fully trained
backbone: its weights, gradients, moments and activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_width: int  # key (= value) projection width: kv heads x head dim
    tied: bool
    gated: bool  # a SwiGLU MLP (gate, up, down) rather than two matrices

    @property
    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block, by its transformers name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
        if self.gated:
            linears |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        else:
            linears |= {"up_proj": (h, i), "down_proj": (i, h)}
        return linears

    @property
    def layer_parameters(self) -> int:
        return sum(a * b for a, b in self.layer_linears.values()) + 2 * self.hidden

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_parameters + embeddings + self.hidden

    def lora_parameters(self, r: int, targets: tuple[str, ...] | str) -> int:
        chosen = (
            self.layer_linears
            if targets == "all-linear"
            else {name: shape for name, shape in self.layer_linears.items() if name in targets}
        )
        return self.layers * sum(r * (a + b) for a, b in chosen.values())


def shape_from_config(config: Mapping[str, Any]) -> ModelShape | None:
    """The shape of a Llama-family or GPT-2 ``config.json``; None for one it cannot read.

    Llama-family counts are exact; GPT-2's leave out its biases and position embeddings.
    """
    try:
        if "n_embd" in config:  # GPT-2
            hidden = int(config["n_embd"])
            return ModelShape(
                hidden=hidden,
                layers=int(config["n_layer"]),
                intermediate=int(config.get("n_inner") or 4 * hidden),
                vocab=int(config["vocab_size"]),
                kv_width=hidden,
                tied=True,
                gated=False,
            )
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return ModelShape(
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            kv_width=int(config.get("num_key_value_heads") or heads) * head_dim,
            tied=bool(config.get("tie_word_embeddings", False)),
            gated=True,
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Estimate:
    """Estimated bytes per device (and on the host under cpu_offload)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    offloaded: int  # host memory under cpu_offload, not counted in total
    total_parameters: int
    trainable_parameters: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def metrics(self) -> dict[str, float]:
        return {
            "memory_estimate_bytes": float(self.total),
            "memory_estimate_parameters_bytes": float(self.parameters),
            "memory_estimate_gradients_bytes": float(self.gradients),
            "memory_estimate_optimizer_bytes": float(self.optimizer),
            "memory_estimate_activations_bytes": float(self.activations),
            "memory_estimate_offloaded_bytes": float(self.offloaded),
        }

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {value / GIB:.1f}"
            for name, value in (
                ("parameters", self.parameters),
                ("gradients", self.gradients),
                ("optimizer", self.optimizer),
                ("activations", self.activations),
            )
        )
        return f"{self.total / GIB:.1f} GiB ({parts})"


def estimate(
    shape: ModelShape,
    *,
    processes: int,
    sharding: str = "none",
    cpu_offload: bool = False,
    mixed_precision: str = "no",
    lora: tuple[int, tuple[str, ...] | str] | None = None,
    gradient_checkpointing: bool = False,
    tokens: int,
    on_policy: bool = False,
    separate_critic: bool = False,
) -> Estimate:
    """Bytes per device for one training step over ``tokens`` tokens per micro-batch (see the module doc)."""
    total = shape.parameters
    trainable = shape.lora_parameters(*lora) if lora else total
    params = total + (trainable if lora else 0)
    divide = processes if sharding == "fsdp" else 1
    half = mixed_precision in ("bf16", "fp16")
    state = 4 * params // divide, 4 * trainable // divide, 8 * trainable // divide
    # Half-precision copies: two gathered layers in flight under FSDP, autocast's cache under DDP.
    copies = 2 * 2 * shape.layer_parameters if sharding == "fsdp" else 2 * params
    extra = copies if half else 0
    if on_policy:
        reference = 0 if lora else 4 * total // divide
        gathered = (2 if half else 4) * params if sharding == "fsdp" else extra
        extra = reference + gathered
    if separate_critic:
        # A second backbone that trains all its weights, gathered for the rollout too.
        state = state[0] + 4 * total // divide, state[1] + 4 * total // divide, state[2] + 8 * total // divide
        extra += (2 if half else 4) * total if sharding == "fsdp" else (2 * total if half else 0)
    act_bytes = 2 if half else 4
    per_token_layer = 6 * shape.hidden + 4 * shape.intermediate + 2 * shape.kv_width
    if gradient_checkpointing:
        stored = shape.layers * shape.hidden + per_token_layer
    else:
        stored = shape.layers * per_token_layer
    activations = tokens * (stored * act_bytes * (2 if separate_critic else 1) + 2 * 4 * shape.vocab)
    offloaded = sum(state) if cpu_offload else 0
    on_device = (0, 0, 0) if cpu_offload else state
    return Estimate(
        parameters=on_device[0] + extra,
        gradients=on_device[1],
        optimizer=on_device[2],
        activations=activations,
        offloaded=offloaded,
        total_parameters=total,
        trainable_parameters=trainable,
    )


def for_stage(
    config: Mapping[str, Any], hp: Any, *, processes: int, mixed_precision: str, pairs: bool
) -> Estimate | None:
    """The estimate for a training stage's hyperparameters ``hp`` on a model ``config``."""
    shape = shape_from_config(config)
    if shape is None:
        return None
    on_policy = hasattr(hp, "max_new_tokens")
    if on_policy:
        micro = int(hp.mini_batch_size)
        length = int(hp.max_prompt_tokens + hp.max_new_tokens)
    else:
        micro = getattr(hp, "micro_batch_size", 0) or max(1, getattr(hp, "batch_size", 1) // processes)
        length = int(getattr(hp, "block_size", 0) or getattr(hp, "max_length", 512))
    settings = getattr(hp, "lora_settings", None)
    return estimate(
        shape,
        processes=processes,
        sharding=getattr(hp, "sharding", "none"),
        cpu_offload=getattr(hp, "cpu_offload", False),
        mixed_precision=mixed_precision,
        lora=(settings.r, settings.target_modules) if settings else None,
        gradient_checkpointing=getattr(hp, "gradient_checkpointing", False),
        tokens=micro * length * (2 if pairs else 1),
        on_policy=on_policy,
        separate_critic=getattr(hp, "value_model", "head") == "separate",
    )
