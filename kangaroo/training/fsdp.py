"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) on Lightning's
``ModelParallelStrategy``, which runs on GPUs with NCCL and on CPU processes with gloo (so the
tests run it for real).

``FSDP2Strategy`` is the ``trainer.strategy`` of a stage config. The stage's ``configure_model``
builds the model whole (and loads ``init_from``), then hands it to ``FSDP2Strategy.parallelize``,
which works from outside the model code:

1. activation checkpointing per block, on or off per part (the ViT blocks through timm's own
   ``set_grad_checkpointing``, the decoder layers through transformers'
   ``activation_checkpointing_enable``: both libraries' maintained switches, which keep parameter
   names unchanged, so checkpoints and optimizer groups read the same with or without it);
2. ``fully_shard`` per ViT block, per LLM decoder layer (the classes the model lists in
   ``_no_split_modules``), then per part (the rest of the vision tower, patchify, projector: a
   frozen part is always a unit of its own, so no unit mixes frozen and trained parts), and the
   root (``KangarooModel``) last, which holds the LLM's embeddings, final norm and output head;
3. mixed precision: parameters gathered in ``param_dtype`` (bf16 where the hardware has it),
   gradients reduced in ``reduce_dtype`` (fp32); the sharded master weights stay fp32. The root and
   the temporal embedding keep their inputs uncast: frame timestamps reach the sinusoid in fp32
   (bf16 would round 200.25 s to 200 s).

It raises if the vision tower or the language model has nothing to wrap.

Sharded checkpoints (``kangaroo.training.sharded_checkpoints``, local or on ``s3://``) are torch
distributed checkpoints, loadable into any number of processes. The stage still writes the consolidated ``model.safetensors`` at its end for the next stage.
``kangaroo.training.weights.consolidate_checkpoint`` turns a sharded checkpoint into one safetensors file offline.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from kangaroo import storage
from kangaroo.modules.precision import cast_buffers
from kangaroo.training.sharded_checkpoints import ShardedCheckpoints

log = logging.getLogger(__name__)

SHARDED_PARTS = ("vision_tower", "language_model")
"""Parts with blocks: activation checkpointing is set per part for these."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ShardedCheckpoints, ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all processes; see the module docstring.

    Args:
        activation_checkpointing: per part (``vision_tower``, ``language_model``) whether each
            block recomputes its activations in the backward pass; a bool sets both.
        param_dtype: dtype of gathered parameters for compute: ``auto`` is ``bfloat16`` on a
            GPU that has it and ``float32`` otherwise; or ``bfloat16``, ``float16``, ``float32``.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32``).
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3);
            ``False`` keeps them until the backward (ZeRO-2: more memory, fewer gathers).
        save_distributed_checkpoint: sharded checkpoints (one file per process); ``False``
            gathers a full checkpoint into one file on rank 0.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: of collectives; a hung rank fails the run after it.
        init_on_meta: with the stage's ``init_from``, build the vision tower and the LLM
            without parameter memory, shard them, then read the file tensor by tensor into
            each process's shards: a process holds its shards plus one whole tensor at a time,
            not the whole fp32 model plus the whole file. ``False``: build whole, load, shard.
    """

    def __init__(
        self,
        activation_checkpointing: bool | dict[str, bool] = False,
        param_dtype: str = "auto",
        reduce_dtype: str = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
        init_on_meta: bool = True,
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if isinstance(activation_checkpointing, bool):
            activation_checkpointing = dict.fromkeys(SHARDED_PARTS, activation_checkpointing)
        unknown = sorted(set(activation_checkpointing) - set(SHARDED_PARTS))
        if unknown:
            raise ValueError(f"activation_checkpointing: unknown part(s) {unknown}; parts with blocks are "
                             f"{list(SHARDED_PARTS)}")
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES and not (name == "param_dtype" and value == "auto"):
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}{' or auto' if name == 'param_dtype' else ''}, "
                                 f"got {value!r}")
        self.activation_checkpointing = {part: bool(activation_checkpointing.get(part, False)) for part in SHARDED_PARTS}
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.init_on_meta = init_on_meta
        self.units: list[str] = []

    def setup_environment(self) -> None:
        if not self._save_distributed_checkpoint:  # refused before any process group or step
            trainer = self.lightning_module.trainer
            for callback in trainer.checkpoint_callbacks:
                root = str(callback.dirpath or trainer.default_root_dir)
                if storage.is_remote(root):
                    raise ValueError(f"one gathered checkpoint file (save_distributed_checkpoint=false) is not written "
                                     f"to {root}: keep the default sharded checkpoints on an object store")
        # every process is one data-parallel shard (Lightning's "auto" would mean one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # -- sharding ------------------------------------------------------------------------------

    def compute_dtype(self) -> torch.dtype:
        if self.param_dtype != "auto":
            return DTYPES[self.param_dtype]
        device = self.root_device
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def parallelize(self, model: nn.Module) -> list[str]:
        """Applies activation checkpointing and ``fully_shard`` to a ``KangarooModel`` in place;
        returns the names of the units (the root last)."""
        self.units = shard_model(model, self.device_mesh["data_parallel"], self.activation_checkpointing,
                                 param_dtype=self.compute_dtype(), reduce_dtype=DTYPES[self.reduce_dtype],
                                 reshard_after_forward=self.reshard_after_forward)
        log.info("FSDP2: %d units over %d processes, activation checkpointing %s, compute dtype %s",
                 len(self.units), self.world_size, self.activation_checkpointing, self.compute_dtype())
        return self.units


def shard_model(
    model: nn.Module,
    mesh,
    activation_checkpointing: dict[str, bool],
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> list[str]:
    """Activation checkpointing, then ``fully_shard`` per block, per part, and the root (see the
    module docstring). Returns the unit names; raises if a part with blocks has none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    vision, llm = model.vision_tower, model.language_model
    blocks = list(getattr(vision.trunk, "blocks", []))
    layers = decoder_layers(llm)
    if not blocks:
        raise ValueError(f"FSDP2: the vision tower ({type(vision.trunk).__name__}) has no `blocks` to shard")
    if not layers:
        raise ValueError(f"FSDP2: found no decoder layers in the language model ({type(llm).__name__}): it lists "
                         f"{getattr(llm, '_no_split_modules', None)!r} as _no_split_modules; nothing would be sharded")
    apply_activation_checkpointing(model, activation_checkpointing)

    cast = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    keep_inputs = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    names = {id(module): name for name, module in model.named_modules()}
    units: list[str] = []

    def shard(module: nn.Module, policy=cast) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        units.append(names[id(module)])

    for module in [*blocks, *layers]:
        if param_dtype != torch.float32:
            _cast_block_buffers(module, param_dtype)
        shard(module)
    shard(vision)
    for part in ("patchify", "projector"):
        module = getattr(model, part)
        if module is not None and any(True for _ in module.parameters()):
            shard(module)
    temporal = model.temporal_embedding
    if any(True for _ in temporal.parameters()):
        shard(temporal, keep_inputs)
    # the root: LLM embeddings, final norm and output head; the frame timestamps pass uncast
    fully_shard(model, mesh=mesh, mp_policy=keep_inputs, reshard_after_forward=reshard_after_forward)
    units.append("(root)")
    model.always_run_vision = True  # a rank with text-only rows still joins the tower's collectives
    return units


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> int:
    """Gives the meta-device parameters of a sharded skeleton (``build_kangaroo(skeleton=True)``
    then ``shard_model``) memory for this process's shards only, uninitialised: the caller fills
    them (``load_weights``). Every tensor that was real (buffers, the small parts' parameters)
    keeps its value. Returns the number of tensors materialised."""
    from torch.distributed.tensor import DTensor

    def is_meta(tensor: torch.Tensor) -> bool:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.device.type == "meta"

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    empty = [name for name, tensor in tensors.items() if is_meta(tensor)]
    if not empty:
        return 0
    keep = {name: tensor.detach().clone() for name, tensor in tensors.items() if not is_meta(tensor)}
    model.to_empty(device=device)  # FSDP2's documented way to materialise a sharded meta model
    after = dict(model.named_parameters())
    after.update(model.named_buffers())
    for name, value in keep.items():
        after[name].copy_(value)
    return len(empty)


def _cast_block_buffers(block: nn.Module, dtype: torch.dtype) -> None:
    """FSDP2 casts parameters to ``param_dtype`` but not buffers; a block computing with a float
    buffer beside its weights (EVA's zero key bias, concatenated into the qkv bias) would then mix
    dtypes in one matmul. A block's float buffers follow the compute dtype; RoPE tables keep fp32
    (``kangaroo.modules.precision``, the rule loading in bf16 follows too)."""
    cast_buffers(block, dtype)


def apply_activation_checkpointing(model: nn.Module, parts: dict[str, bool]) -> None:
    """Per block recomputation in the backward pass, for the parts set to ``True``."""
    if parts.get("vision_tower"):
        model.vision_tower.trunk.set_grad_checkpointing(True)
    if parts.get("language_model"):
        llm = model.language_model
        if hasattr(llm, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks: modules of the classes it names in ``_no_split_modules``
    (``LlamaDecoderLayer`` for Llama), which transformers keeps for exactly this purpose."""
    classes = set(getattr(language_model, "_no_split_modules", None) or ())
    return [m for m in language_model.modules() if type(m).__name__ in classes]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU: gathered from every process under FSDP2 (a collective
    call: every rank makes it; only rank 0 receives the tensors), the plain state dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
