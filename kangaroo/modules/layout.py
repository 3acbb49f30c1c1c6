"""The visual token layout and its arithmetic, with no model attached.

Data code (tokenization, prepare) needs to know how many placeholder tokens a media item of
``n`` frames becomes and which ids frame it, but never the model's weights: it imports this
module only. ``KangarooModel.layout`` and ``kangaroo.modules.builder.visual_layout`` give the
``VisualLayout`` of a model or of a config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label of a position the loss skips (prompts, visual tokens, padding), as in transformers."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The vision tower's input normalisation (OpenAI CLIP's, which EVA02-CLIP keeps)."""


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, 3, s, s)`` uint8 -> ``dtype`` with CLIP mean and std, computed in float32 on the
    tensor's own device. Batches carry uint8 frames (a quarter of float32 over the host-to-device
    copy); the model normalises them on arrival (``KangarooModel.get_visual_features``)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


@dataclass
class VisualTokens:
    """Token ids of the visual layout ``<vi_start> F1 <eof> F2 <eof> ... Fn <eov> <vi_end>``.

    ``placeholder`` fills each ``Fi`` once per visual token and is replaced by the projected
    features; the others are ordinary (trainable) embeddings of the language model.
    """

    placeholder: int
    vi_start: int
    eof: int
    eov: int
    vi_end: int

    def __post_init__(self) -> None:
        ids = [self.placeholder, self.vi_start, self.eof, self.eov, self.vi_end]
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError(f"visual token ids must be distinct and non-negative, got {self}")

    def layout(self, slots: int, tokens_per_slot: int) -> list[int]:
        """Token ids for ``slots`` temporal slots of ``tokens_per_slot`` visual tokens each."""
        if slots < 1:
            raise ValueError(f"a visual layout needs at least one slot, got {slots}")
        ids = [self.vi_start]
        for slot in range(slots):
            ids += [self.placeholder] * tokens_per_slot
            ids.append(self.eof if slot < slots - 1 else self.eov)
        ids.append(self.vi_end)
        return ids


def patchified_grid(kernel: tuple[int, int, int], frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Grid ``(t, h, w)`` after a kernel = stride patchify of ``frames`` frames of ``height x
    width`` tokens. A single frame (an image) is repeated to fill the temporal kernel. Any other
    size the kernel does not divide is an error, never a silent crop."""
    kt, kh, kw = kernel
    if frames == 1:
        frames = kt
    if frames % kt:
        raise ValueError(
            f"patchify needs a frame count divisible by its temporal kernel {kt} (or a single image), got {frames} frames"
        )
    if height % kh or width % kw:
        raise ValueError(
            f"patchify kernel {kh}x{kw} does not divide the token grid {height}x{width}; pick a resolution "
            f"whose patch grid is a multiple of the kernel"
        )
    return frames // kt, height // kh, width // kw


@dataclass(frozen=True)
class VisualLayout:
    """How media become tokens for one model.

    ``image_size``: the square frame size in pixels the vision tower takes; ``grid``: its patch
    tokens per frame ``(h, w)``; ``kernel``: the patchify kernel ``(t, h, w)``, ``None`` without
    patchify (stages 1-2); ``tokens``: the layout's token ids.
    """

    image_size: int
    grid: tuple[int, int]
    kernel: tuple[int, int, int] | None
    tokens: VisualTokens

    def visual_grid(self, frames: int) -> tuple[int, int, int]:
        """``(slots, h, w)`` of the token grid the LLM sees for ``frames`` frames."""
        if frames < 1:
            raise ValueError(f"a media item needs at least one frame, got {frames}")
        h, w = self.grid
        if self.kernel is None:
            return frames, h, w
        return patchified_grid(self.kernel, frames, h, w)

    def num_visual_tokens(self, frames: int) -> int:
        slots, h, w = self.visual_grid(frames)
        return slots * h * w

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per video frame at this resolution (128 at 448 with patchify)."""
        kt = self.kernel[0] if self.kernel is not None else 1
        return self.num_visual_tokens(kt) // kt

    def placeholder_ids(self, frames: int) -> list[int]:
        """The visual layout of one media item of ``frames`` frames, as token ids."""
        slots, h, w = self.visual_grid(frames)
        return self.tokens.layout(slots, h * w)
