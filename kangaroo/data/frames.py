"""Frames as the chunks store them: raw uint8, or each frame compressed as a JPEG or WebP image.

A record of a compressed dataset holds ``frames`` (the encoded images laid end to end, one
``bytes`` field) and ``frame_sizes`` (each image's length) in place of ``pixels``: LitData needs
the same fields in every record, whatever its frame count, so the frames cannot be a list of
their own. ``load_frames`` turns either form back into ``pixels``, ``(n, 3, s, s)`` uint8; it runs
in the loader's workers, so decoding overlaps the training step. Chunks written before
compression (``pixels`` only) read as before. Images are encoded with Pillow (its JPEG and WebP
codecs; nothing is written here by hand).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

FRAME_FORMATS = ("raw", "jpeg", "webp")
_PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP"}


def store_frames(pixels: torch.Tensor, frame_format: str = "raw", quality: int = 90) -> dict[str, Any]:
    """The record fields holding ``pixels`` (``(n, 3, s, s)`` uint8) in ``frame_format``."""
    if frame_format == "raw":
        return {"pixels": pixels}
    from PIL import Image

    images = []
    for frame in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format=_PIL_FORMAT[frame_format], quality=quality)
        images.append(buffer.getvalue())
    return {"frames": b"".join(images), "frame_sizes": np.asarray([len(i) for i in images], dtype=np.int64),
            "frame_size": np.asarray(pixels.shape[-2:], dtype=np.int64)}


def load_frames(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``pixels`` decoded from ``frames`` where it holds compressed frames."""
    if "frames" not in record:
        return record
    from PIL import Image

    blob, sizes = record.pop("frames"), record.pop("frame_sizes")
    height, width = (int(v) for v in record.pop("frame_size"))
    frames, start = [], 0
    for size in np.asarray(sizes).tolist():
        with Image.open(io.BytesIO(blob[start:start + size])) as image:
            frames.append(np.asarray(image.convert("RGB")))
        start += size
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous() if frames \
        else torch.zeros(0, 3, height, width, dtype=torch.uint8)
    record["pixels"] = pixels
    return record
