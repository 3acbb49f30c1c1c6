"""Shared fixtures: tiny models built from the package's own tiny configs, and synthetic samples.

Nothing is downloaded: the hub is switched off for every test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from kangaroo.modules import IGNORE_INDEX, KangarooModel, kangaroo_tiny


@dataclass
class Sample:
    """One training sample as the data pipeline will hand it to the model."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (frames, 3, H, W)
    timestamps: torch.Tensor  # (frames,) seconds


def make_sample(model: KangarooModel, frames: int, text_len: int, seed: int) -> Sample:
    """A prompt, the visual layout of ``frames`` frames, then ``text_len`` labelled answer tokens."""
    g = torch.Generator().manual_seed(seed)
    size = model.vision_tower.image_size
    vocab_text = model.visual_tokens.placeholder - 1  # ordinary tokens lie below the visual ones
    prompt = torch.randint(1, vocab_text, (3,), generator=g).tolist()
    answer = torch.randint(1, vocab_text, (text_len,), generator=g).tolist()
    ids = prompt + model.placeholder_ids(frames) + answer
    labels = [IGNORE_INDEX] * (len(ids) - text_len) + answer
    pixels = torch.randn(frames, 3, size, size, generator=g)
    timestamps = torch.sort(torch.rand(frames, generator=g) * 30.0).values
    return Sample(ids, labels, pixels, timestamps)


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Packs ``samples`` into one row, positions restarting per sample."""
    return {
        "input_ids": torch.tensor([sum((s.input_ids for s in samples), [])]),
        "labels": torch.tensor([sum((s.labels for s in samples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(s.input_ids))) for s in samples), [])]),
        "pixel_values": torch.cat([s.pixel_values for s in samples]),
        "timestamps": torch.cat([s.timestamps for s in samples]),
        "frame_counts": torch.tensor([s.pixel_values.shape[0] for s in samples]),
    }


@pytest.fixture(scope="session")
def tiny_model() -> KangarooModel:
    """Stage 3-5 shape: 112 px, patchify on."""
    torch.manual_seed(0)
    return kangaroo_tiny().eval()


@pytest.fixture(scope="session")
def tiny_model_no_patchify() -> KangarooModel:
    """Stage 1-2 shape: 56 px, no patchify."""
    torch.manual_seed(0)
    return kangaroo_tiny(image_size=56, patchify=False).eval()
