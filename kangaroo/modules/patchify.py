"""Spatial-temporal patchify: a 3D depthwise convolution that merges 2x2x2 visual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kangaroo.modules.layout import patchified_grid


@dataclass
class PatchifyConfig:
    """The 3D depthwise convolution introduced in stage 3 (paper §IV-B, Stage II)."""

    kernel: tuple[int, int, int] = (2, 2, 2)
    """Kernel and stride over (time, height, width), in frames and patches."""
    init: Literal["uniform", "random"] = "uniform"
    """``uniform``: weights ``1/prod(kernel)`` and bias 0, exactly average pooling (the paper's
    "Uniform"); ``random``: PyTorch's default convolution init."""

    def __post_init__(self) -> None:
        self.kernel = tuple(int(k) for k in self.kernel)
        if len(self.kernel) != 3 or min(self.kernel) < 1:
            raise ValueError(f"patchify.kernel must be three positive ints (t, h, w), got {self.kernel}")
        if self.init not in ("uniform", "random"):
            raise ValueError(f"patchify.init must be 'uniform' or 'random', got {self.init!r}")


class SpatialTemporalPatchify(nn.Module):
    """Depthwise ``Conv3d`` (groups = channels) with kernel = stride over one video's token grid."""

    def __init__(self, dim: int, config: PatchifyConfig | None = None) -> None:
        super().__init__()
        self.config = config or PatchifyConfig()
        self.kernel = self.config.kernel
        self.conv = nn.Conv3d(dim, dim, self.kernel, stride=self.kernel, groups=dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init == "uniform":
            nn.init.constant_(self.conv.weight, 1.0 / math.prod(self.kernel))
            nn.init.zeros_(self.conv.bias)
        else:
            self.conv.reset_parameters()

    def output_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Grid after patchify for ``frames`` frames of ``height x width`` tokens.

        A single frame (an image) is repeated to fill the temporal kernel. Any other size the
        kernel does not divide is an error, never a silent crop.
        """
        return patchified_grid(self.kernel, frames, height, width)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid``: ``(t, h, w, c)`` tokens of one video, or of several laid end to end in time
        when each is a multiple of ``kt`` frames long (windows never straddle two of them).
        Returns ``(t/kt, h/kh, w/kw, c)``."""
        t, h, w, _ = grid.shape
        self.output_grid(t, h, w)  # validates
        if t == 1:
            grid = grid.expand(self.kernel[0], -1, -1, -1)
        x = grid.permute(3, 0, 1, 2).unsqueeze(0)  # (1, c, t, h, w)
        # a fresh tensor, not a view (the next reshape would copy anyway): a sharded (FSDP2)
        # module's backward hook sits on its output
        return self.conv(x).squeeze(0).permute(1, 2, 3, 0).clone(memory_format=torch.contiguous_format)
