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
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    target = scaled_size(h, w, size, mode)
    # one frame at a time in float32 (FrameScaler): the clip itself stays uint8
    scaler = FrameScaler(size, mode)
    scaled = frames if target == (h, w) else np.stack([scaler(frame) for frame in frames])
    x = torch.from_numpy(np.ascontiguousarray(scaled)).permute(0, 3, 1, 2)
    if mode in ("stretch", "crop"):
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        return x[..., top : top + size, left : left + size].contiguous()
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    out[:] = torch.tensor(CLIP_MEAN).mul(255).round().to(torch.uint8).view(1, 3, 1, 1)
    top, left = (size - x.shape[-2]) // 2, (size - x.shape[-1]) // 2
    out[..., top : top + x.shape[-2], left : left + x.shape[-1]] = x
    return out


def scaled_size(h: int, w: int, size: int, mode: ResizeMode = "pad") -> tuple[int, int]:
    """The ``(h, w)`` an ``h x w`` frame is resized to before ``fit_frames`` pads or crops it."""
    if mode == "stretch":
        return size, size
    if mode == "crop":
        scale = size / min(h, w)
        return max(size, round(h * scale)), max(size, round(w * scale))
    if mode == "pad":
        scale = size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    raise ValueError(f"resize mode must be pad, crop or stretch, got {mode!r}")


class FrameScaler:
    """Resizes decoded ``(H, W, 3)`` uint8 frames to ``scaled_size`` (uint8), one at a time, so
    that a clip is held at the model's resolution, not the file's: 160 frames of a 4K video are
    4 GB as uint8, 16 GB as float32. ``fit_frames`` on the result pads or crops it without
    resizing again, and gives exactly what it gives on the full-size frames (one resize, rounded
    once). The float32 copy of the frame being resized lives in one buffer reused from frame to
    frame (a new 100 MB buffer per 4K frame fragments the heap: resident memory grows by several
    of them).

    The resize is torch's antialiased bilinear, not PyAV's ``reformat`` (swscale), so that frames
    decoded here, frames handed to ``Generator.prompt`` directly and data prepared before this
    path existed stay bit-identical."""

    def __init__(self, size: int, mode: ResizeMode = "pad") -> None:
        scaled_size(1, 1, size, mode)  # checks the mode
        self.size, self.mode = size, mode
        self._buffer: torch.Tensor | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        target = scaled_size(h, w, self.size, self.mode)
        if target == (h, w):
            return frame
        if self._buffer is None or self._buffer.shape != (1, 3, h, w):
            self._buffer = torch.empty((1, 3, h, w), dtype=torch.float32)
        self._buffer[0].copy_(torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1))
        out = _resize(self._buffer, *target)[0].round().clamp(0, 255).to(torch.uint8)
        return out.permute(1, 2, 0).numpy()


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``(n, 3, s, s)`` uint8 -> float32 with CLIP mean and std (``normalize_pixels``)."""
    return normalize_pixels(pixels)
