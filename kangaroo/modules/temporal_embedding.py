"""Temporal position embedding (TPE) from real frame timestamps, paper eq. (3)-(4)."""

from __future__ import annotations

import torch
from torch import nn


class TemporalPositionEmbedding(nn.Module):
    """Adds a sinusoidal embedding of each frame's timestamp to every token of that frame.

    Paper eq. (3): dimension ``i`` of ``TPE(t)`` is ``sin(t / theta**(i/d))`` for even ``i`` and
    ``cos(t / theta**(i/d))`` for odd ``i``, with ``t`` the frame's presentation time in seconds
    (a float, not the frame index). Eq. (4): ``Z_hat = Z + TPE(t)``.

    The module has no parameters and no buffers: the frequencies are recomputed per call, which
    costs ``d`` exponentials and keeps the module valid after meta-device construction.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim <= 0 or theta <= 0:
            raise ValueError(f"TemporalPositionEmbedding needs dim > 0 and theta > 0, got dim={dim}, theta={theta}")
        self.dim = dim
        self.theta = theta

    def embed(self, timestamps: torch.Tensor) -> torch.Tensor:
        """``timestamps``: ``(n,)`` seconds. Returns ``(n, dim)`` float32."""
        t = timestamps.to(torch.float32).reshape(-1, 1)
        exponent = torch.arange(self.dim, device=t.device, dtype=torch.float32) / self.dim
        angles = t / self.theta**exponent
        even = torch.arange(self.dim, device=t.device) % 2 == 0
        return torch.where(even, torch.sin(angles), torch.cos(angles))

    def forward(self, features: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """``features``: ``(n, tokens, dim)`` for ``n`` frames; ``timestamps``: ``(n,)`` seconds."""
        if timestamps.numel() != features.shape[0]:
            raise ValueError(
                f"got {timestamps.numel()} timestamps for {features.shape[0]} frames; each frame needs one"
            )
        return features + self.embed(timestamps).to(features.dtype).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"
