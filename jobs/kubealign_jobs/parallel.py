"""How a training stage lays out the model it trains: whole per process (DDP) or sharded
(FSDP2), all weights or LoRA adapters, and how it gets one plain model back at the end.

    trainable = parallel.prepare(ctx, hp, lm, wrap=models.CompletionLogps)
    loop.train(ctx, hp, model=trainable, ...)        # shards, adapters and checkpoints handled
    publish_results(ctx, metrics, trainable.writer(tokenizer), ...)

- ``sharding: fsdp``: ``fully_shard`` on every decoder layer, on untied embeddings and head,
  then on the root, so each process holds 1/N of the parameters, gradients and AdamW state and
  gathers one layer at a time for its forward and backward. Mixed precision is FSDP's own
  policy (parameters cast to bf16/fp16 for compute, gradients reduced in fp32);
  ``cpu_offload`` keeps the shards in CPU memory. gloo on CPUs, NCCL on GPUs; one process
  works too (a world of one). Only rank 0 loads the weights; the others build the model on
  the meta device and receive their shards (`weights_from_rank0`).
- ``lora``: peft adapters on the targeted linear layers; everything else is frozen except
  a stage's head (the reward model's score). The reference policy of a preference stage is
  the same weights with the adapters switched off (`Trainable.reference`): one copy, not two.
- Checkpoints of a sharded or adapted model are `torch.distributed.checkpoint` folders: every
  rank writes its own shard, only trainable tensors are stored, and a run resumes at any
  world size (DCP reshards on load). See ``loop.save_training_state``.
- The artifact is always a plain ``save_pretrained`` folder (adapters merged into the
  weights), or with ``lora_merge: false`` the adapter alone, as peft saves and loads it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubealign_jobs import memory
from kubealign_jobs import model as models
from kubealign_jobs.config import ConfigError
from kubealign_jobs.runtime import StageContext, resolve_precision
from kubealign_jobs.stages import LoraHyperparameters, LoraSettings, ShardingHyperparameters

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter a stage trains
PEFT_PREFIX = "base_model.model."  # where peft's PeftModel keeps the wrapped transformers model


# ---------------------------------------------------------------------------- process group


def ensure_process_group(ctx: StageContext) -> None:
    """FSDP and DCP run collectives even for one process: give a lone process a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if ctx.world_size > 1:
        raise RuntimeError("a multi-process stage without torch.distributed (launch it under torchrun)")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- LoRA


def add_adapters(lm: Any, settings: LoraSettings, *, head: str | None = None) -> Any:
    """Wrap ``lm`` in a peft model with fresh adapters (B = 0: it still computes exactly ``lm``).

    ``head``: a module that trains in full besides the adapters (a reward model's ``score``).
    Returns the PeftModel; its ``get_base_model()`` is ``lm`` with the adapter layers injected.
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = (
        settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int, computes alpha / r
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=[head] if head else None,
        bias="none",
    )
    try:
        return get_peft_model(lm, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"hyperparameters.lora.target_modules: {exc}") from exc


def merge_adapters(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """A LoRA-injected model's state dict as the plain model's: W + (alpha / r) * B @ A per target.

    Keys of the injected model: ``<m>.base_layer.weight``, ``<m>.lora_A.default.weight`` (r x in),
    ``<m>.lora_B.default.weight`` (out x r); a trained head is ``<h>.modules_to_save.default.*``
    next to its frozen ``<h>.original_module.*``. Computed in float32, stored in the base's dtype.
    """
    merged: dict[str, torch.Tensor] = {}
    lora_a = re.compile(rf"^(.*)\.lora_A\.{ADAPTER}\.weight$")
    for key, value in state.items():
        if ".lora_B." in key or ".original_module." in key:
            continue
        if match := lora_a.match(key):
            module = match.group(1)
            base = state[f"{module}.base_layer.weight"]
            delta = state[f"{module}.lora_B.{ADAPTER}.weight"].float() @ value.float()
            if delta.shape != base.shape:  # Conv1D layers (GPT-2) store the weight transposed
                delta = delta.T
            merged[f"{module}.weight"] = (base.float() + settings.scaling * delta).to(base.dtype)
            continue
        if ".lora_" in key or ".base_layer.weight" in key:
            continue
        plain = key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")
        merged[plain] = value
    return merged


# ---------------------------------------------------------------------------- FSDP


def decoder_layers(lm: nn.Module, within: nn.Module | None = None) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), in order,
    in ``lm`` or in a module ``within`` that holds it."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in (within or lm).modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"hyperparameters.sharding: fsdp does not know the layers of a {type(lm).__name__} "
            "(it declares no _no_split_modules)"
        )
    return layers


def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP's policy: compute in bf16/fp16 with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(mixed_precision))
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def weights_from_rank0(ctx: StageContext, hp: Any) -> bool:
    """Whether this process builds its model without weights and receives its shard from rank 0
    (`shard`): under FSDP on several processes, every process but the first. A node then
    holds one whole copy of the weights while the model loads, not one per process."""
    return getattr(hp, "sharding", "none") == "fsdp" and ctx.world_size > 1 and not ctx.is_main


def shard(
    ctx: StageContext, root: nn.Module, lm: Any, hp: ShardingHyperparameters, precision: str
) -> tuple[nn.Module, ...]:
    """``fully_shard`` each decoder layer of ``lm``, its untied embeddings and head, then ``root``;
    return the units that stay gathered after their forward pass (the head and the root).

    Collective. When some process built ``root`` without weights (`weights_from_rank0`), rank 0
    sends every tensor of its state and each process keeps its shard.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    ensure_process_group(ctx)
    device_type = "cuda" if ctx.device.type == "cuda" else "cpu"
    mesh = init_device_mesh(device_type, (ctx.world_size,))
    options: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision)}
    if hp.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    empty = any(p.is_meta for p in root.parameters())
    from_rank0 = ctx.world_size > 1 and ctx.sum_across_ranks({"empty": float(empty)})["empty"] > 0
    if from_rank0 and ctx.is_main and empty:
        raise RuntimeError("rank 0 must hold the weights it sends")
    # Rank 0's whole state, kept alive past sharding so that it can be sent.
    whole: dict[str, Any] = root.state_dict() if from_rank0 and ctx.is_main else {}
    if not hp.cpu_offload and not empty:
        root.to(ctx.device)
    # Every decoder layer inside the root: the LM's, and a second backbone's (ppo's critic).
    for layer in decoder_layers(lm, within=root):
        fully_shard(layer, **options)
    # Untied input embeddings and output head as units of their own (torchtitan's layout): in
    # the root they would stay gathered, with their gradients, through the whole forward and
    # backward; on their own they are gathered only while used. Backward needs the head right
    # after forward used it, so it stays gathered in between.
    kept: tuple[nn.Module, ...] = (root,)  # FSDP's default for the root: backward needs it next
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if embeddings is not None and head is not None and head.weight is not embeddings.weight:
        fully_shard(embeddings, **options)
        fully_shard(head, **options, reshard_after_forward=False)
        kept = (head, root)
    fully_shard(root, **options)
    if from_rank0:
        _receive_from_rank0(root, whole, torch.device("cpu") if hp.cpu_offload else ctx.device)
    return kept


def _receive_from_rank0(root: nn.Module, whole: dict[str, Any], device: torch.device) -> None:
    """Give a sharded ``root`` rank 0's values: its ``whole`` state there, ``{}`` elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not whole:
        # Memory for this process's shards; buffers left out of the state dict (rotary
        # frequencies) keep the values the architecture computed.
        buffers = {name: b.detach().clone() for name, b in root.named_buffers()}
        root.to_empty(device=device)
        with torch.no_grad():
            for name, buffer in root.named_buffers():
                buffer.copy_(buffers[name])
    set_model_state_dict(
        root, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


# ---------------------------------------------------------------------------- the trainable model


@dataclass
class Trainable:
    """The model a training stage trains, however it is laid out.

    module:   what the loop calls (a `models.CompletionLogps`, `models.LastTokenReward` or the LM)
    lm:       the transformers model inside ``module`` (adapter layers injected when ``adapters``)
    adapters: the peft model around ``lm``, or None
    sharded:  FSDP2 (``module`` and every decoder layer of ``lm`` are FSDP units)
    """

    module: nn.Module
    lm: Any
    adapters: Any
    sharded: bool
    lora: LoraSettings | None
    merge: bool
    memory: memory.Estimate | None = None
    # FSDP units that stay gathered after their forward pass (`shard`), for `gathered` to restore.
    kept_after_forward: tuple[nn.Module, ...] = ()

    @property
    def distributed_checkpoints(self) -> bool:
        """Checkpoints as DCP shards: a sharded model has no whole copy anywhere, and an adapted
        one needs only its adapters stored (its base is the stage's input)."""
        return self.sharded or self.adapters is not None

    def reference(self) -> contextlib.AbstractContextManager[Any]:
        """Within: the model computes its base (adapters off), the frozen reference of dpo."""
        if self.adapters is None:
            raise RuntimeError("only a LoRA model carries its reference inside")
        return self.adapters.disable_adapter()  # type: ignore[no-any-return]

    def reshard(self) -> None:
        """FSDP leaves the root's (and the output head's) parameters gathered after a forward
        without backward (an evaluation, the reference pass); shard them again before the
        optimizer sees them."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            for unit in self.module.modules():
                if isinstance(unit, FSDPModule):
                    unit.reshard()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within: every FSDP unit holds its whole parameters and keeps them across forward passes.

        Sampling needs this: ranks generate for different numbers of steps (each stops when its
        own rows end), which a sharded forward, a collective per layer, cannot do. It costs one
        whole model per process while it lasts. Collective on entry; nothing happens unsharded.
        """
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        # Sampling calls the LM inside the root, never the root: FSDP must first settle which
        # module is its root, which it otherwise does at the root's first forward pass.
        self.module._get_fsdp_state()._lazy_init()  # type: ignore[operator]
        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                # Back to the layout `shard` chose: every unit frees its gathered weights after
                # forward, except those backward needs right away.
                kept = any(unit is k for k in self.kept_after_forward)
                unit.set_reshard_after_forward(not kept, recurse=False)

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP: reduce-scatter gradients only on the last micro-batch of a step."""
        if self.sharded:
            self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]

    def full_state_dict(self, inner: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The whole state dict of ``inner`` (default ``lm``) on rank 0 (CPU), keys as in it;
        empty elsewhere. Collective."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            state = self.module.state_dict()
        prefix = _prefix_of(self.module, self.lm if inner is None else inner)
        return {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and isinstance(v, torch.Tensor)
        }

    def writer(self, tokenizer: Any) -> Callable[[Path], object]:
        """The artifact writer for `runtime.publish_results`. Collective: every rank calls it.

        Unsharded full fine-tuning writes ``lm`` as it is; otherwise rank 0 assembles the
        whole weights first (merging the adapters unless ``lora_merge`` is false).
        """
        if not self.distributed_checkpoints:
            return lambda dest: models.save_pretrained(self.lm, tokenizer, dest)
        state = self.full_state_dict()
        if self.adapters is not None and not self.merge:
            return lambda dest: save_adapter(self.adapters, state, tokenizer, dest)
        if self.lora is not None:
            state = merge_adapters(state, self.lora)
        return lambda dest: save_plain(self.lm, state, tokenizer, dest)

    def write_config(self, tokenizer: Any, dest: Path) -> None:
        """A DCP checkpoint's ``model/``: config and tokenizer (the weights are in its shards)."""
        dest.mkdir(parents=True, exist_ok=True)
        self.lm.config.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))


def _prefix_of(root: nn.Module, inner: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    raise ValueError("the model is not inside the trained module")


def _plain_class(lm: nn.Module) -> type[Any]:
    """The transformers class of ``lm`` (``fully_shard`` swaps in an FSDP subclass)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    for cls in type(lm).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"{type(lm).__name__} is not a transformers model")


def save_plain(lm: Any, state: dict[str, torch.Tensor], tokenizer: Any, dest: Path) -> Path:
    """Write ``state`` (plain keys) as a save_pretrained folder of ``lm``'s architecture. Rank 0."""
    import copy

    config = copy.deepcopy(lm.config)
    with torch.device("meta"):
        plain = _plain_class(lm)(config)
    result = plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    tied = {name for name, p in plain.named_parameters(remove_duplicate=False) if not p.is_meta}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"assembled weights do not fit the model: missing {missing}, extra {result.unexpected_keys}"
        )
    return models.save_pretrained(plain, tokenizer, dest)


def save_adapter(adapters: Any, state: dict[str, torch.Tensor], tokenizer: Any, dest: Path) -> Path:
    """Write the adapter alone (adapter_config.json + adapter_model.safetensors) and the tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    adapters.save_pretrained(str(dest), state_dict={PEFT_PREFIX + k: v for k, v in state.items()})
    tokenizer.save_pretrained(str(dest))
    return dest


def prepare(
    ctx: StageContext,
    hp: Any,
    lm: Any,
    *,
    wrap: Callable[[Any], nn.Module] = lambda lm: lm,
    head: str | None = None,
    pairs: bool = False,
) -> Trainable:
    """Adapters (``hp.lora``), gradient checkpointing, the training wrapper, then sharding.

    The order matters: peft must see the plain layers to inject its own, checkpointing is set
    on the transformers model, and FSDP shards whatever modules exist by then.
    """
    estimate = estimate_memory(ctx, hp, lm.config.to_dict(), pairs=pairs)
    settings = hp.lora_settings if isinstance(hp, LoraHyperparameters) else None
    adapters = None
    if settings is not None:
        adapters = add_adapters(lm, settings, head=head)
        lm = adapters.get_base_model()
        trainable, total = _count(lm)
        ctx.emit({"event": "lora", "trainable_parameters": trainable, "parameters": total})
    if getattr(hp, "gradient_checkpointing", False):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapters is not None:
            # Frozen embeddings give checkpointed layers inputs without grad; the adapters inside
            # would then get none. This makes the embedding output require grad.
            lm.enable_input_require_grads()
    module = wrap(lm)
    sharded = getattr(hp, "sharding", "none") == "fsdp"
    kept: tuple[nn.Module, ...] = ()
    if sharded:
        kept = shard(ctx, module, lm, hp, getattr(hp, "mixed_precision", "auto"))
    else:
        module.to(ctx.device)
        if adapters is not None:
            ensure_process_group(ctx)  # DCP checkpoints
    merge = bool(getattr(hp, "lora_merge", True))
    return Trainable(
        module=module,
        lm=lm,
        adapters=adapters,
        sharded=sharded,
        lora=settings,
        merge=merge,
        memory=estimate,
        kept_after_forward=kept,
    )


def estimate_memory(
    ctx: StageContext, hp: Any, config: dict[str, Any], *, pairs: bool
) -> memory.Estimate | None:
    """Log the estimated bytes per device (`kubealign_jobs.memory`); fail fast when a GPU is too small.

    Called with the input's config.json before its weights load (`loop.starting_weights`) and
    again by `prepare`, which puts the figures in the stage's metrics.
    """
    precision = resolve_precision(getattr(hp, "mixed_precision", "auto"))
    found = memory.for_stage(config, hp, processes=ctx.world_size, mixed_precision=precision, pairs=pairs)
    if found is None:
        return None
    ctx.emit({"event": "memory_estimate", **found.metrics(), "parameters": found.total_parameters})
    if ctx.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(ctx.device).total_memory
        if found.total > capacity:
            raise ConfigError(
                f"hyperparameters.sharding: this stage needs an estimated {found.describe()} per GPU, more "
                f"than the {capacity / memory.GIB:.1f} GiB of this one; use sharding: fsdp over more GPUs, "
                "lora, gradient_checkpointing or a smaller micro_batch_size"
            )
    return found


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- DCP state


def _dcp_options(trainable: Trainable) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Adapters: the frozen base is the stage's input, not checkpoint state.
    frozen_out = trainable.adapters is not None
    return StateDictOptions(ignore_frozen_params=frozen_out, strict=not frozen_out)


def save_distributed(trainable: Trainable, model: nn.Module, optimizer: Any, dest: Path) -> None:
    """This rank's shard of the model and optimizer state under ``dest`` (rank 0 adds .metadata)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options(trainable))
    save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(str(dest)))


def load_distributed(trainable: Trainable, model: nn.Module, optimizer: Any, source: Path) -> None:
    """Load model and optimizer state saved by `save_distributed` at any world size."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    options = _dcp_options(trainable)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    # DCP loads in place into these tensors, resharding from whatever world size wrote them.
    load({"model": model_state, "optimizer": optim_state}, storage_reader=FileSystemReader(str(source)))
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
    )


# ---------------------------------------------------------------------------- lock-step batches


def no_grad(*, sharded: bool) -> contextlib.AbstractContextManager[Any]:
    """inference_mode, except around a sharded model: FSDP would gather its layers into inference
    tensors that the next training step cannot update in place."""
    return torch.no_grad() if sharded else torch.inference_mode()


def lockstep_batches(
    items: list[Any], *, rank: int, world_size: int, batch_size: int, lockstep: bool
) -> Iterator[tuple[list[Any], bool]]:
    """This rank's share of ``items`` in batches, and whether each batch counts.

    A sharded forward pass is a collective (every rank gathers each layer), so with
    ``lockstep`` every rank runs the same number of batches: a rank whose share is short
    repeats a real item in batches marked False, whose outputs the caller ignores.
    """
    mine = items[rank::world_size]
    count = 0
    for start in range(0, len(mine), batch_size):
        count += 1
        yield mine[start : start + batch_size], True
    if lockstep and items:
        per_rank = -(-len(items) // world_size)
        for _ in range(-(-per_rank // batch_size) - count):
            yield items[:1], False
