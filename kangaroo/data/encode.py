"""One manifest sample to one training record: decode, sample, resize, tokenize, fit the budget."""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from kangaroo import storage
from kangaroo.data.frames import FRAME_FORMATS, store_frames
from kangaroo.data.manifest import ManifestSample, Reject
from kangaroo.data.tokenization import ChatEncoder
from kangaroo.data.transforms import ResizeMode, FrameScaler, fit_frames
from kangaroo.data.video import FrameSampling, MediaError, read_video
from kangaroo.modules.layout import VisualLayout


@dataclass
class PrepareConfig:
    """How a stage turns manifest samples into training records."""

    tokenizer: str
    """A Hugging Face tokenizer id or local directory (``save_pretrained`` layout)."""
    sampling: FrameSampling = field(default_factory=FrameSampling)
    resize: ResizeMode = "pad"
    """``pad`` (keep everything, pad with the CLIP mean), ``crop`` (centre square) or ``stretch``."""
    max_tokens: int = 2560
    """The stage's sequence budget in tokens (512 / 2560 / 10K / 22K in the paper)."""
    overflow: Literal["drop_frames", "skip"] = "drop_frames"
    """A sample over ``max_tokens``: drop frames evenly until it fits, or skip it (counted).
    Text is never truncated."""
    image_max_time: float = 60.0
    """Images get a timestamp drawn uniformly from ``[0, image_max_time)`` seconds, seeded by id."""
    seed: int = 0
    shuffle: bool = True
    """Write the samples in an order shuffled with ``seed``. LitData shuffles the order of the
    chunks and the samples inside each chunk, never across chunks, so a manifest grouped by kind
    (all long clips, then all short ones) would otherwise train on one kind for a long stretch."""
    frame_format: Literal["raw", "jpeg", "webp"] = "raw"
    """How frames are stored in the chunks: ``raw`` uint8 (3 x size x size bytes a frame), or
    each frame compressed as a ``jpeg`` or ``webp`` image (``kangaroo.data.frames``), decoded by
    the loader's workers. See docs/data.md for the bytes per frame."""
    frame_quality: int = 90
    """The codec's quality, 1-100, for ``jpeg`` and ``webp``."""

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"prepare.max_tokens must be at least 16, got {self.max_tokens}")
        if self.overflow not in ("drop_frames", "skip"):
            raise ValueError(f"prepare.overflow must be drop_frames or skip, got {self.overflow!r}")
        if self.resize not in ("pad", "crop", "stretch"):
            raise ValueError(f"prepare.resize must be pad, crop or stretch, got {self.resize!r}")
        if self.frame_format not in FRAME_FORMATS:
            raise ValueError(f"prepare.frame_format must be one of {list(FRAME_FORMATS)}, got {self.frame_format!r}")
        if isinstance(self.frame_quality, bool) or not isinstance(self.frame_quality, int) \
                or not 1 <= self.frame_quality <= 100:
            raise ValueError(f"prepare.frame_quality must be an integer from 1 to 100, got {self.frame_quality!r}")


@dataclass
class Media:
    frames: np.ndarray  # (n, H, W, 3) uint8
    timestamps: np.ndarray  # (n,) seconds


class SampleEncoder:
    """Callable for LitData ``optimize``: a ``ManifestSample`` in, a record dict out, or ``None``
    after appending the reason to ``rejects_dir/rejects-<pid>.jsonl``.

    ``layout`` (``kangaroo.modules.builder.visual_layout`` of the stage's model) fixes the frame
    size and the visual tokens; the tokenizer is loaded lazily, once per worker process, unless
    one is given (inference, which holds it already).
    """

    def __init__(self, prepare: PrepareConfig, layout: VisualLayout, rejects_dir: str | None, tokenizer=None) -> None:
        self.prepare = prepare
        self.layout = layout
        self.rejects_dir = rejects_dir
        self._chat: ChatEncoder | None = ChatEncoder(tokenizer, layout.tokens) if tokenizer is not None else None

    def __call__(self, sample: ManifestSample) -> dict[str, Any] | None:
        try:
            return self.encode(sample)
        except (MediaError, ValueError) as err:
            self._reject(Reject(sample.id, str(err)))
            return None

    def encode(self, sample: ManifestSample, generation_prompt: bool = False) -> dict[str, Any]:
        """The record of ``sample``. ``generation_prompt``: a prompt to be answered (the
        conversation ends with a user turn; see ``ChatEncoder.encode``), as inference builds it
        through the same decode, sampling, resize and timestamp path as ``prepare``."""
        return self.encode_media(sample, self._load(sample), generation_prompt)

    def encode_media(self, sample: ManifestSample, media: Media | None, generation_prompt: bool = False) -> dict[str, Any]:
        """``encode`` with the media already decoded (``None``: text only): frames dropped evenly
        past the budget, resized; a text-only sample over the budget is an error."""
        chat = self.chat_encoder()
        size = self.layout.image_size
        if media is None:
            encoded = [chat.encode(c, generation_prompt=generation_prompt) for c in self._conversations(sample)]
            tokens = sum(len(e.input_ids) for e in encoded)
            if tokens > self.prepare.max_tokens:
                raise ValueError(f"sample has {tokens} tokens, over the budget of {self.prepare.max_tokens}")
            pixels, timestamps = torch.zeros(0, 3, size, size, dtype=torch.uint8), np.zeros(0, np.float32)
        else:
            keep, encoded = self._fit_budget(sample, media, chat, generation_prompt)
            pixels = fit_frames(media.frames[keep], size, self.prepare.resize)
            timestamps = media.timestamps[keep]
        # a preference pair's rejected conversation rides along (empty otherwise: every record of a
        # dataset has the same fields); both count towards the budget, since they train in one row
        rejected = encoded[1] if len(encoded) > 1 else None
        encoded = encoded[0]
        return {
            "id": sample.id,
            "input_ids": np.asarray(encoded.input_ids, dtype=np.int32),
            "labels": np.asarray(encoded.labels, dtype=np.int32),
            "rejected_input_ids": np.asarray(rejected.input_ids if rejected else [], dtype=np.int32),
            "rejected_labels": np.asarray(rejected.labels if rejected else [], dtype=np.int32),
            **store_frames(pixels, self.prepare.frame_format, self.prepare.frame_quality),
            "timestamps": timestamps.astype(np.float32),
            "num_tokens": len(encoded.input_ids) + (len(rejected.input_ids) if rejected else 0),
            "task": str(sample.meta.get("task", "")),
            "category": str(sample.meta.get("category", "")),
        }

    @staticmethod
    def _conversations(sample: ManifestSample) -> list[list[dict[str, str]]]:
        return [sample.conversations] + ([sample.rejected] if sample.rejected else [])

    def _fit_budget(self, sample: ManifestSample, media: Media, chat: ChatEncoder, generation_prompt: bool = False):
        """Indices of the frames kept and the encodings (a pair's two); drops frames evenly while
        over budget."""
        budget, n = self.prepare.max_tokens, len(media.frames)
        step = self.prepare.sampling.multiple_of if n > 1 else 1
        count = n
        while True:
            keep = np.linspace(0, n - 1, count).round().astype(int) if count < n else np.arange(n)
            encoded = [chat.encode(c, self.layout.placeholder_ids(count), generation_prompt)
                       for c in self._conversations(sample)]
            tokens = sum(len(e.input_ids) for e in encoded)
            if tokens <= budget:
                return keep, encoded
            if self.prepare.overflow == "skip":
                raise ValueError(f"sample has {tokens} tokens, over the budget of {budget} (overflow=skip)")
            if count - step < 1:
                raise ValueError(f"sample has {tokens} tokens with its fewest frames ({count}), over the budget of {budget}")
            count -= step

    def _load(self, sample: ManifestSample) -> Media | None:
        if sample.media_type is None:
            return None
        if storage.is_remote(sample.media_path):
            # decoding seeks back and forth: the object is fetched once into a local scratch file
            with tempfile.TemporaryDirectory(prefix="kangaroo-media-") as scratch:
                local = os.path.join(scratch, "media" + os.path.splitext(sample.media_path)[1])
                try:
                    storage.download(sample.media_path, local)
                except FileNotFoundError as err:
                    raise MediaError(f"missing file: {sample.media_path}") from err
                return self._decode(sample, local)
        return self._decode(sample, sample.media_path)

    def _decode(self, sample: ManifestSample, path: str) -> Media:
        if sample.media_type == "video":
            # each frame resized as it is decoded: a request or prepare worker holds the clip at
            # the model's resolution (fit_frames then only pads or crops it)
            clip = read_video(path, self.prepare.sampling, FrameScaler(self.layout.image_size, self.prepare.resize))
            return Media(clip.frames, clip.timestamps)
        return Media(read_image(path)[None], np.asarray([self._image_time(sample.id)], np.float32))

    def _image_time(self, sample_id: str) -> float:
        return random.Random(f"{self.prepare.seed}:{sample_id}").uniform(0.0, self.prepare.image_max_time)

    def chat_encoder(self) -> ChatEncoder:
        if self._chat is None:
            from transformers import AutoTokenizer

            self._chat = ChatEncoder(AutoTokenizer.from_pretrained(self.prepare.tokenizer), self.layout.tokens)
        return self._chat

    def _reject(self, reject: Reject) -> None:
        path = os.path.join(self.rejects_dir, f"rejects-{os.getpid()}.jsonl")
        with open(path, "a", encoding="utf-8") as out:
            out.write(reject.to_json() + "\n")


def read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as err:
        raise MediaError(f"missing file: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(f"unreadable image: {err}") from err
