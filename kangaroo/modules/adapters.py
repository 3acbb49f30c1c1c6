"""Low-rank adapters (LoRA) on a part of the model, through ``peft``.

A stage declares them beside ``trainable`` (``adapters: {language_model: {kind: lora, r: 64, ...}}``):
``peft.inject_adapter_in_model`` wraps the named linear layers of that part in place (no
``PeftModel`` wrapper: the part stays what the rest of the model calls), the part's own weights
stay frozen and only the adapters train. ``merged_state_dict`` gives the weights with every
adapter folded in, under the names of a model without adapters, so a stage's weights file, the
next stage's ``init_from`` and ``kangaroo export`` need not know adapters were used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ADAPTER_MARK = "lora_"
"""What every adapter parameter's name holds (``...q_proj.lora_A.default.weight``)."""


@dataclass
class AdapterConfig:
    """One part's adapters."""

    kind: Literal["lora"] = "lora"
    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32.0
    """Scale numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Last names of the linear layers to adapt (``q_proj`` matches every ``...self_attn.q_proj``)."""

    def __post_init__(self) -> None:
        if self.kind != "lora":
            raise ValueError(f"adapters: kind must be 'lora', got {self.kind!r}")
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapters: need r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout})")
        if not self.target_modules:
            raise ValueError("adapters: target_modules names no layer")


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


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights with every adapter folded into the layer it wraps, under the names the
    model has without adapters (``...q_proj.weight``, not ``...q_proj.base_layer.weight``)."""
    from peft.tuners.lora import LoraLayer

    state = {key: value.detach() for key, value in model.state_dict().items() if ADAPTER_MARK not in key}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                key = f"{module_name}.base_layer.weight"
                delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
                state[key] = state[key] + delta.to(state[key].dtype)
    return {key.replace(".base_layer.", "."): value for key, value in state.items()}
