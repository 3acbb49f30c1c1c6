"""Low-rank adapters (LoRA) on a part of the model, through ``peft``.

A stage declares them beside ``trainable`` (``adapters: {language_model: {kind: lora, r: 64, ...}}``):
``peft.inject_adapter_in_model`` wraps the named linear layers of that part in place (no
``PeftModel`` wrapper: the part stays what the rest of the model calls), the part's own weights
stay frozen and only the adapters train. ``merged_state_dict`` gives the weights with every
adapter folded in, under the names of a model without adapters, so a stage's weights file, the
next stage's ``init_from`` and ``kangaroo export`` need not know adapters were used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ADAPTER_MARK = "lora_"
"""What every adapter parameter's name holds (``...q_proj.lora_A.default.weight``)."""
ADAPTERS_NAME = "adapters.safetensors"
"""The adapters' tensors, beside a stage's merged weights or a model folder's base weights."""
ADAPTERS_CONFIG_NAME = "adapters.json"
"""Which part has which adapters (``{language_model: {kind: lora, r: 64, ...}}``), beside them."""


@dataclass
class AdapterConfig:
    """One part's adapters."""

    kind: Literal["lora", "qlora"] = "lora"
    """``qlora``: LoRA on the part's base weights quantized to 4 bits (bitsandbytes), CUDA only."""
    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32.0
    """Scale numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Last names of the linear layers to adapt (``q_proj`` matches every ``...self_attn.q_proj``)."""

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "qlora"):
            raise ValueError(f"adapters: kind must be 'lora' or 'qlora', got {self.kind!r}")
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapters: need r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout})")
        if not self.target_modules:
            raise ValueError("adapters: target_modules names no layer")


def check_device(adapters: dict[str, AdapterConfig], device: torch.device) -> None:
    """Refuses 4-bit bases (``kind: qlora``) where they cannot run: bitsandbytes' 4-bit layers
    need a CUDA device."""
    quantized = sorted(part for part, config in adapters.items() if config.kind == "qlora")
    if not quantized:
        return
    if device.type != "cuda":
        raise ValueError(f"adapters on {quantized} are kind: qlora, whose 4-bit base weights (bitsandbytes) need a "
                         f"CUDA device; this run is on {device.type}: use kind: lora (full-precision base)")
    raise NotImplementedError(f"adapters on {quantized}: kind: qlora is not implemented yet (its 4-bit base layers "
                              "have not been run on a GPU in this project); use kind: lora")


def add_adapters(model: nn.Module, adapters: dict[str, AdapterConfig]) -> None:
    """Wraps the target layers of each named part of ``model`` (a ``KangarooModel``) in LoRA
    adapters, in place. A target that names no linear layer of its part is an error naming it and
    the layer names the part has."""
    from peft import LoraConfig, inject_adapter_in_model

    parts = model.parts()
    for name, config in adapters.items():
        part = parts.get(name)
        if part is None:
            raise ValueError(f"adapters: the model has no part {name!r} (parts: {sorted(k for k, v in parts.items() if v)})")
        linear = sorted({module_name.rsplit(".", 1)[-1] for module_name, module in part.named_modules()
                         if isinstance(module, nn.Linear)})
        unknown = sorted(set(config.target_modules) - set(linear))
        if unknown:
            raise ValueError(f"adapters.{name}.target_modules: {unknown} name no linear layer of {name}; "
                             f"its linear layers are {linear}")
        bypassed = sorted(set(config.target_modules) & _bypassed(part))
        if bypassed:
            raise ValueError(f"adapters.{name}.target_modules: {bypassed} of {name} are applied through their "
                             "weight alone (EVA attention adds its q/v biases in one F.linear call), so an adapter "
                             f"there would change nothing; adapt others of {linear}")
        # the full names of the matching linear layers: peft would also wrap any other module whose
        # name ends the same (the tower's patch embedding convolution is a `proj` too)
        targets = [module_name for module_name, module in part.named_modules()
                   if isinstance(module, nn.Linear) and module_name.rsplit(".", 1)[-1] in config.target_modules]
        inject_adapter_in_model(LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                           target_modules=targets), part)


def _bypassed(part: nn.Module) -> set[str]:
    """Names of linear layers whose module is never called: timm's EVA attention (the tower of
    both models) computes ``F.linear(x, self.qkv.weight, q_bias|0|v_bias)`` when its biases are
    not separate, so a wrapper around ``qkv`` would be skipped."""
    names = set()
    for module in part.modules():
        if getattr(module, "q_bias", None) is not None and not getattr(module, "qkv_bias_separate", False) \
                and isinstance(getattr(module, "qkv", None), nn.Linear):
            names.add("qkv")
    return names


def merged_state_dict(state: dict[str, torch.Tensor], adapters: dict[str, AdapterConfig]) -> dict[str, torch.Tensor]:
    """The weights of a model with adapters (``state``: its state dict, possibly gathered from
    FSDP2 shards onto one process) with every adapter folded into the layer it wraps, under the
    names the model has without adapters (``...q_proj.weight``, not ``...base_layer.weight``).
    Computed on the tensors rather than through peft's layers, which under FSDP2 hold shards and
    would compute the update only inside a collective: ``W + alpha / r * B @ A``, peft's LoRA
    update (``tests/test_adapters.py`` checks the merged model's logits against the adapter
    model's)."""
    merged = {}
    for key, value in state.items():
        if ADAPTER_MARK in key:
            continue
        value = value.detach()
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            config = adapters[key.split(".", 1)[0]]
            down, up = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = value + (config.alpha / config.r * (up.float() @ down.float())).to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors of ``model``, by the names of the model with adapters."""
    return {key: value.detach() for key, value in model.state_dict().items() if ADAPTER_MARK in key}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s own weights without its adapters, under the names of a model without them."""
    return {key.replace(".base_layer.", "."): value.detach() for key, value in model.state_dict().items()
            if ADAPTER_MARK not in key}


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Takes each adapter's update out of the layer it wraps: for a model whose layers were loaded
    with the merged weights (a stage's ``model.safetensors``) and whose adapters were then loaded
    beside them, the layers hold the base weights again (to float rounding). Written here rather
    than through peft's ``unmerge``, which only undoes a merge peft itself recorded."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight
            for adapter in module.active_adapters:
                weight -= module.get_delta_weight(adapter).to(weight.dtype)


def read_adapters(folder: str) -> tuple[dict[str, AdapterConfig], dict[str, torch.Tensor]] | None:
    """The adapters kept in ``folder`` (``kangaroo.training.weights.write_adapters``), or None when it has none."""
    import os

    from safetensors.torch import load_file

    config_path, tensors_path = os.path.join(folder, ADAPTERS_CONFIG_NAME), os.path.join(folder, ADAPTERS_NAME)
    if not os.path.isfile(config_path):
        return None
    if not os.path.isfile(tensors_path):
        raise FileNotFoundError(f"{folder} has {ADAPTERS_CONFIG_NAME} but no {ADAPTERS_NAME}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            configs = {part: AdapterConfig(**fields) for part, fields in json.load(handle).items()}
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read {config_path}: {err}") from err
    return configs, load_file(tensors_path)


def load_adapters(model: nn.Module, adapters: dict[str, AdapterConfig], state: dict[str, torch.Tensor],
                  where: str = ADAPTERS_NAME) -> None:
    """Adds ``adapters`` to ``model`` and fills them from ``state``: every adapter tensor of the
    model must be there with its shape, and nothing else."""
    add_adapters(model, adapters)
    own = adapter_state_dict(model)
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unknown or shapes:
        raise ValueError(f"{where} does not match the adapters its config declares: missing {missing[:5]} "
                         f"({len(missing)}), not in the model {unknown[:5]} ({len(unknown)}), shape mismatch {shapes[:5]}")
    model.load_state_dict(state, strict=False)
