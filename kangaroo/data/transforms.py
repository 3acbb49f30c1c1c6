"""Resizing frames to the stage resolution and CLIP normalisation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from kangaroo.modules.layout import CLIP_MEAN, CLIP_STD, normalize_pixels  # noqa: F401 (CLIP_STD: re-export)

ResizeMode = Literal["pad", "crop", "stretch"]


def fit_frames(frames: np.ndarray, size: int, mode: ResizeMode = "pad") -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 -> ``(n, 3, size, size)`` uint8.

    - ``pad`` (default): scale the longer side to ``size`` and pad the rest with the CLIP mean
      colour, centred; nothing of the frame is lost.
    - ``crop``: scale the shorter side to ``size`` and keep the centre square.
    - ``stretch``: resize to ``size x size`` ignoring the aspect ratio.

    Frames stay uint8 (a quarter of float32) up to the device, where the model normalises them.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if mode == "stretch":
        out = _resize(x, size, size)
    elif mode == "crop":
        scale = size / min(h, w)
        x = _resize(x, max(size, round(h * scale)), max(size, round(w * scale)))
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        out = x[..., top : top + size, left : left + size]
    elif mode == "pad":
        scale = size / max(h, w)
        x = _resize(x, max(1, round(h * scale)), max(1, round(w * scale)))
        out = torch.tensor(CLIP_MEAN).mul(255).view(1, 3, 1, 1).expand(x.shape[0], 3, size, size).clone()
        top, left = (size - x.shape[-2]) // 2, (size - x.shape[-1]) // 2
        out[..., top : top + x.shape[-2], left : left + x.shape[-1]] = x
    else:
        raise ValueError(f"resize mode must be pad, crop or stretch, got {mode!r}")
    return out.round().clamp(0, 255).to(torch.uint8)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``(n, 3, s, s)`` uint8 -> float32 with CLIP mean and std (``normalize_pixels``)."""
    return normalize_pixels(pixels)
