"""Model weights between stages: a safetensors file out, a strict, explained load in."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from kangaroo import storage

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
DCP_METADATA = ".metadata"
"""The metadata file of a torch distributed checkpoint (a sharded checkpoint folder)."""


def save_weights(model: nn.Module, path: str) -> str:
    """Writes every parameter and persistent buffer of ``model`` to a safetensors file, through
    a temporary name and a rename, so that a cut-off write never looks finished (``path`` may
    be an ``s3://`` URL)."""
    from safetensors.torch import save_model

    with storage.local_output(path) as local:  # a remote path is uploaded with retries
        save_model(model, local)  # drops tied duplicates; load_weights restores them by alias
    return path


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> str:
    """Writes a state dict (the gathered weights of a sharded model) to a safetensors file like
    ``save_weights``. Every key is written; a tensor sharing memory with one already taken (tied
    embeddings) gets its own copy, since safetensors refuses shared storage."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone().contiguous() if where in seen else value.contiguous()
        seen.add(where)
    with storage.local_output(path) as local:
        save_file(tensors, local)
    return path


def write_adapters(folder: str, adapters: dict, state: dict[str, torch.Tensor]) -> None:
    """Writes a stage's or model folder's LoRA adapters into ``folder`` (local or object store):
    their tensors (``adapters.safetensors``) and part -> ``AdapterConfig`` (``adapters.json``),
    which ``kangaroo.modules.adapters.read_adapters`` reads back."""
    from kangaroo.modules.adapters import ADAPTERS_CONFIG_NAME, ADAPTERS_NAME

    save_state_dict(state, storage.join(folder, ADAPTERS_NAME))
    storage.write_text(storage.join(folder, ADAPTERS_CONFIG_NAME),
                       json.dumps({part: dataclasses.asdict(config) for part, config in adapters.items()}, indent=1))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads a safetensors file, a folder holding ``model.safetensors``, a sharded checkpoint
    folder (written by any number of processes), or a Lightning/torch checkpoint
    (``weights_only=True``; its ``state_dict``, with the module's ``model.`` prefix removed).
    ``path`` may be an ``s3://`` URL."""
    if is_distributed_checkpoint(path):
        return read_distributed_weights(path)
    if storage.isdir(path):
        path = _weights_in(path)
    if not storage.exists(path):
        raise ValueError(f"init_from: {path} does not exist")
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="kangaroo-weights-") as scratch:
            return read_state_dict(storage.download(path, os.path.join(scratch, os.path.basename(path))))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in several types
        raise ValueError(f"init_from: cannot read {path} as a weights-only checkpoint: {err}") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {path} holds no state_dict")
    if all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def _weights_in(folder: str) -> str:
    """The weights file of a stage or model folder (``refuse_kept_apart`` checked)."""
    refuse_kept_apart(folder)
    return storage.join(folder, WEIGHTS_NAME)


def refuse_kept_apart(path: str) -> None:
    """Refuses a model folder that keeps adapters apart from its base weights (``kangaroo export
    --keep-adapters``), or its ``model.safetensors``: that file alone is not the model the folder
    holds (``load_pretrained`` reads both)."""
    from kangaroo.modules.adapters import ADAPTERS_CONFIG_NAME

    if storage.is_remote(path):
        return
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, ADAPTERS_CONFIG_NAME)):
        raise ValueError(f"{path}: the folder keeps its adapters apart from its base weights; a stage starts from "
                         f"merged weights: write them with `kangaroo export` without --keep-adapters")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _Weights:
    """The tensors of an ``init_from`` source by name, read when asked for.

    A local safetensors file is read one tensor at a time with plain reads at the offsets its
    header gives, so a process never holds the whole file beside the model. (Not through
    ``safetensors.safe_open``: it maps the file, and every page a process reads through the map
    stays in its resident set, the whole file by the end of the load, in every process.) Any
    other source (a checkpoint, a sharded folder, an object store) is read whole, as before."""

    def __init__(self, path: str) -> None:
        self.path, self._header, self._state = path, None, None
        local = path
        if storage.isdir(path) and not is_distributed_checkpoint(path):
            local = _weights_in(path)
        if local.endswith(".safetensors") and not storage.is_remote(local) and os.path.isfile(local):
            self._local = local
            with open(local, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            self._start = 8 + size
            self._header = header
            if any(entry["dtype"] not in _SAFETENSORS_DTYPES for entry in header.values()):
                self._header, self._state = None, read_state_dict(path)
        else:
            self._state = read_state_dict(path)

    def keys(self) -> list[str]:
        return list(self._header) if self._header is not None else list(self._state)

    def shape(self, key: str) -> torch.Size:
        if self._header is not None:
            return torch.Size(self._header[key]["shape"])
        return self._state[key].shape

    def get(self, key: str) -> torch.Tensor:
        if self._header is None:
            return self._state[key]
        entry = self._header[key]
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        with open(self._local, "rb") as handle:
            handle.seek(self._start + begin)
            data = bytearray(handle.read(end - begin))
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def load_weights(model: nn.Module, path: str, new_parts: list[str] | tuple[str, ...] = (),
                 base_only: bool = False) -> dict[str, list[str]]:
    """Loads ``path`` into ``model`` strictly, one tensor at a time.

    Keys missing from the file are allowed only under ``new_parts`` (a part introduced in this
    stage, such as ``patchify`` in stage 3: it keeps its own initialisation). The ViT's absolute
    position table is resampled when the resolution changed (stage 2 at 224 -> stage 3 at 448).
    Any other missing, unexpected or mis-shaped key is an error that lists them. The model may
    be sharded (FSDP2): each process then copies only its own shard of every tensor, and holds
    at most one whole tensor of the file at a time besides its shards. ``base_only``: the base
    weights of a folder whose adapters are kept apart are wanted alone (``load_pretrained``).
    Returns
    ``{"new": [...], "resized": [...]}``.
    """
    if not base_only:
        refuse_kept_apart(path)
    source = _Weights(path)
    keys = set(source.keys())
    own = model.state_dict(keep_vars=True)  # the parameters and buffers themselves, filled in place
    aliases = _aliases(model)
    missing = [k for k in own if k not in keys and not any(a in keys for a in aliases.get(k, ()))]
    unexpected = sorted(k for k in keys if k not in own)
    allowed = tuple(f"{part}." for part in new_parts)
    new = [k for k in missing if k.startswith(allowed)]
    missing = [k for k in missing if not k.startswith(allowed)]
    resized, mismatched = [], []
    for key in sorted(keys & set(own)):
        shape = source.shape(key)
        if own[key].shape != shape:
            if key.endswith("pos_embed") and len(shape) == 3:
                resized.append(key)
            else:
                mismatched.append(f"{key}: file {tuple(shape)}, model {tuple(own[key].shape)}")
    problems = []
    if missing:
        problems.append(f"missing from the file: {_listing(missing)} (allowed new parts: {list(new_parts)})")
    if unexpected:
        problems.append(f"not in the model: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise ValueError(f"init_from {path} does not match the model; " + "; ".join(problems))
    for key, target in own.items():
        name = key if key in keys else next((a for a in aliases.get(key, ()) if a in keys), None)
        if name is None:
            continue  # a new part's key
        value = source.get(name)
        if key in resized:
            value = _resample_position_table(model, key, value, target.shape)
            log.info("init_from: resampled %s %s -> %s", key, tuple(source.shape(name)), tuple(target.shape))
        _copy_into(target, value)
        del value
    return {"new": new, "resized": [f"{k} {tuple(source.shape(k))} -> {tuple(own[k].shape)}" for k in resized]}


@torch.no_grad()
def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copies ``value`` (whole) into a model tensor in place: into this process's shard when the
    tensor is sharded (a DTensor), cast to the tensor's dtype."""
    value = value.to(dtype=target.dtype)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # every process read the same file: each takes its own shard, no communication
        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Keys naming one tensor (tied embeddings): each maps to the others. By identity, so that
    it holds before a model's parameters exist (the meta device) and once they are sharded."""
    by_tensor = defaultdict(list)
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor[id(value)].append(key)
    return {k: [o for o in keys if o != k] for keys in by_tensor.values() if len(keys) > 1 for k in keys}


def _resample_position_table(model: nn.Module, key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    module = model.get_submodule(key.rsplit(".", 1)[0])
    prefix = getattr(module, "num_prefix_tokens", 1)
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError(f"init_from: cannot resample {key}: no patch grid on {type(module).__name__}")
    return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix).to(value.dtype)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} key(s): {shown}" + (", ..." if len(keys) > limit else "")


def is_distributed_checkpoint(path: str) -> bool:
    if storage.is_remote(path):
        return storage.exists(storage.join(path, DCP_METADATA))
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_METADATA))


def read_distributed_weights(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a sharded checkpoint folder, read whole into this one process
    (any number of processes may have written it). Keys lose the stage's ``model.`` prefix."""
    # torch's public DCP loader needs a state dict of the right shapes to fill; reading without
    # one is what torch's own ``dcp_to_torch_save`` does, through these two names.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not is_distributed_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint folder (no {DCP_METADATA})")
    if storage.is_remote(path):  # read from a downloaded copy (DCP's reader takes a local folder)
        with tempfile.TemporaryDirectory(prefix="kangaroo-weights-") as scratch:
            return read_distributed_weights(storage.download(path, os.path.join(scratch, "checkpoint")))
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=FileSystemReader(path),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    state = loaded.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise ValueError(f"sharded checkpoint {path} holds no model state_dict")
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def consolidate_checkpoint(path: str, output: str) -> str:
    """Writes the weights of the sharded checkpoint ``path`` to the safetensors file ``output``."""
    return save_state_dict(read_distributed_weights(path), output)
