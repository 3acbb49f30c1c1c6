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

Sharded checkpoints are torch distributed checkpoints (a folder: one file per process, the
metadata, Lightning's ``meta.pt``), loadable into any number of processes; the folder gets its
``COMPLETE`` marker after every process has written its part, and only such folders are resumed
from. The stage still writes the consolidated ``model.safetensors`` at its end for the next stage.
``kangaroo.training.weights.consolidate_checkpoint`` turns a sharded checkpoint into one safetensors file offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from kangaroo import storage
from kangaroo.modules.precision import cast_buffers
from kangaroo.training.checkpoints import COMPLETE_MARKER

log = logging.getLogger(__name__)

SHARDED_PARTS = ("vision_tower", "language_model")
"""Parts with blocks: activation checkpointing is set per part for these."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
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

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = self.broadcast(str(filepath))
        if storage.is_remote(target):
            return self._save_to_object_store(checkpoint, target, storage_options)
        path = Path(target)
        if self.global_rank == 0 and path.is_dir():
            # a checkpoint saved again under its name (``last.ckpt``): its old shards go first, so
            # none from another number of processes stays behind, and it has no marker until whole
            storage.remove(str(path))
        self.barrier()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.barrier()  # every process has written its shard
        if self.global_rank == 0:
            with open(path / COMPLETE_MARKER, "w") as handle:
                handle.write("complete\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _save_to_object_store(self, checkpoint: dict[str, Any], target: str, storage_options: Any) -> None:
        """A sharded checkpoint on ``s3://``: every process writes its shard into a staging folder
        on its own machine and uploads the files it wrote (``__<rank>_0.distcp``; rank 0 also
        ``.metadata`` and ``meta.pt``), each upload retried like every other
        (``storage.with_retries``). Rank 0 writes ``COMPLETE`` once every process has uploaded.
        The processes vote after each step, so a failure on one (past its retry budget) fails the
        save on every process at once and none waits in a barrier for it. The checkpoints under
        other names stay whole; the one saved again under its name (``last.ckpt``) is removed
        first and has no marker until written again."""
        staging = os.path.join(tempfile.gettempdir(), self.broadcast(f"kangaroo-checkpoint-{uuid.uuid4().hex}"))

        def step(action) -> None:
            error: BaseException | None = None
            try:
                action()
            except Exception as err:  # noqa: BLE001 - decided by every process together
                error = err
            if self._any_process(error is not None):
                if self.local_rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                if error is not None:
                    raise error
                raise storage.UploadError(f"another process failed while saving {target}; the checkpoints "
                                          "written before are intact")

        def prepare() -> None:
            os.makedirs(staging, exist_ok=True)
            if self.global_rank == 0:
                present = storage.with_retries(lambda: storage.exists(target), target, what="looking up")
                if present:
                    storage.with_retries(lambda: storage.remove(target), target, what="removing")

        def upload() -> None:
            mine = [name for name in sorted(os.listdir(staging))
                    if name.startswith(f"__{self.global_rank}_") or (self.global_rank == 0 and not name.startswith("__"))]
            if not any(name.startswith(f"__{self.global_rank}_") for name in mine):
                raise OSError(f"no shard of process {self.global_rank} in {staging}: the temporary folder "
                              "must be the same path on every machine (TMPDIR)")
            for name in mine:
                storage.upload(os.path.join(staging, name), storage.join(target, name))

        def mark() -> None:
            if self.global_rank == 0:
                storage.write_text(storage.join(target, COMPLETE_MARKER), "complete\n")

        step(prepare)
        # DCP's save is collective and raises on every process when one fails
        super().save_checkpoint(checkpoint, Path(staging), storage_options)
        step(upload)
        step(mark)
        if self.local_rank == 0:  # every process of this machine has uploaded (the votes above)
            shutil.rmtree(staging, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, after a sharded checkpoint folder on an object store is downloaded
        into a staging folder, once per machine (a retried attempt starts from an empty folder)."""
        path = self.broadcast(str(checkpoint_path))
        if not storage.is_remote(path):
            return super().load_checkpoint(path, weights_only)
        staging = os.path.join(tempfile.gettempdir(), self.broadcast(f"kangaroo-checkpoint-{uuid.uuid4().hex}"))
        local = os.path.join(staging, os.path.basename(path.rstrip("/")))

        def fetch() -> None:
            shutil.rmtree(local, ignore_errors=True)
            storage.download(path, local)

        error: BaseException | None = None
        try:
            os.makedirs(staging, exist_ok=True)
            if self.local_rank == 0:
                storage.with_retries(fetch, path, what="downloading")
        except Exception as err:  # noqa: BLE001 - decided by every process together
            error = err
        try:
            if self._any_process(error is not None):  # also: this machine's copy is whole
                if error is not None:
                    raise error
                raise OSError(f"another machine could not download {path}")
            return super().load_checkpoint(local, weights_only)
        finally:
            self.barrier()
            if self.local_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)

    def _any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process calls it)."""
        value = torch.tensor([int(flag)], device=self.root_device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())


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
