"""AdamW parameter groups (weight decay, layer-wise LR decay on the ViT) and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.optim import param_groups_layer_decay
from torch import nn

from kangaroo.modules.model import KangarooModel


@dataclass
class OptimizerConfig:
    """The paper's optimisation (Table II): AdamW, cosine to ``min_lr`` after a linear warm-up."""

    lr: float = 1e-4
    """Peak learning rate of the LLM, projector and patchify, and of the last ViT block."""
    min_lr: float = 1e-6
    """The cosine ends here (scaled like ``lr`` for each ViT layer)."""
    warmup_steps: int = 0
    weight_decay: float = 0.05
    """Not applied to norms, biases, embeddings and the ViT's position/class tokens."""
    layer_decay: float = 0.9
    """ViT block ``i`` of ``n`` trains at ``lr * layer_decay ** (n - i)``; the patch embedding below all."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"optimizer: need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optimizer.layer_decay must be in (0, 1], got {self.layer_decay}")


def parameter_groups(model: KangarooModel, config: OptimizerConfig) -> list[dict]:
    """Groups of trainable parameters, each with ``name``, ``lr`` (already scaled),
    ``lr_scale`` and ``weight_decay``. Every trainable parameter appears exactly once."""
    groups: list[dict] = []
    trunk = model.vision_tower.trunk
    if any(p.requires_grad for p in trunk.parameters()):
        # timm's BEiT-style grouping knows the ViT's layer structure (its group_matcher).
        no_decay = set(getattr(trunk, "no_weight_decay", lambda: set())())
        for group in param_groups_layer_decay(trunk, weight_decay=config.weight_decay,
                                              no_weight_decay_list=no_decay, layer_decay=config.layer_decay):
            groups.append({"name": f"vision_tower.{_timm_group_name(group)}", "params": group["params"],
                           "lr_scale": group["lr_scale"], "weight_decay": group["weight_decay"]})
    for part_name, part in model.parts().items():
        if part is None or part_name == "vision_tower":
            continue
        decay, no_decay = [], []
        embeddings = {id(m.weight) for m in part.modules() if isinstance(m, nn.Embedding)}
        for param in part.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or id(param) in embeddings else decay).append(param)
        for suffix, params, wd in (("decay", decay, config.weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": f"{part_name}.{suffix}", "params": params, "lr_scale": 1.0, "weight_decay": wd})
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    _check_coverage(model, groups)
    return groups


def _timm_group_name(group: dict) -> str:
    scale = group["lr_scale"]
    kind = "decay" if group["weight_decay"] else "no_decay"
    return f"lr_scale_{scale:.4f}.{kind}"


def _check_coverage(model: nn.Module, groups: list[dict]) -> None:
    seen: dict[int, str] = {}
    for group in groups:
        for param in group["params"]:
            if id(param) in seen:
                raise AssertionError(f"a parameter is in optimizer groups {seen[id(param)]} and {group['name']}")
            seen[id(param)] = group["name"]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise AssertionError(f"trainable parameters missing from the optimizer groups: {missing[:5]}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from ``1/(warmup+1)`` to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
