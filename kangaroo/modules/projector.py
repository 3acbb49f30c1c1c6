"""The multi-modal projector from vision width to the language model's hidden size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass
class ProjectorConfig:
    kind: Literal["linear", "mlp"] = "linear"
    """``linear`` (the released model) or ``mlp``: Linear-GELU-Linear, as in LLaVA-1.5."""

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projector.kind must be 'linear' or 'mlp', got {self.kind!r}")


def build_projector(in_dim: int, out_dim: int, config: ProjectorConfig | None = None) -> nn.Module:
    """Maps ``(..., in_dim)`` visual tokens to ``(..., out_dim)`` LLM embeddings.

    Returned as a bare ``nn.Linear`` / ``nn.Sequential`` so that state-dict keys read
    ``projector.weight`` or ``projector.0.weight``, the layout of released ``mm_projector.*`` keys.
    """
    config = config or ProjectorConfig()
    if config.kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
