"""Small real video files, one per thing a curation filter looks for, and a manifest over them.

Used by the tests and ``benchmarks/curate_throughput.py``, and handy for trying a curation
config: ``write_demo_set(folder)`` writes the files and ``folder/manifest.jsonl``. Everything is
drawn here with a seeded generator, except the face, which is the astronaut photograph
scikit-image ships (``skimage.data.astronaut``, public domain, NASA).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kangaroo.data.video import write_video

SIZE = (192, 144)  # width, height


def _background(rng: np.random.Generator, colour: tuple[int, int, int]) -> np.ndarray:
    """A smooth, textured background: flat colour plus low-frequency noise, so optical flow and
    scene detection see structure."""
    noise = rng.normal(0, 1, (SIZE[1] // 16 + 1, SIZE[0] // 16 + 1, 3))
    noise = np.asarray(Image.fromarray(((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)).resize(
        SIZE, Image.BICUBIC), np.float32)
    return np.clip(np.asarray(colour, np.float32) * 0.7 + noise * 0.3, 0, 255).astype(np.uint8)


def moving_frames(rng: np.random.Generator, seconds: float, fps: int = 10,
                  colour: tuple[int, int, int] = (60, 110, 160)) -> np.ndarray:
    """A background panning sideways with a disc crossing it."""
    back = _background(rng, colour)
    frames = []
    for i in range(round(seconds * fps)):
        frame = np.roll(back, 3 * i, axis=1).copy()
        image = Image.fromarray(frame)
        x = 10 + (5 * i) % (SIZE[0] - 50)
        ImageDraw.Draw(image).ellipse((x, 50, x + 40, 90), fill=(230, 200, 40))
        frames.append(np.asarray(image))
    return np.stack(frames)


def still_frames(rng: np.random.Generator, seconds: float, fps: int = 10) -> np.ndarray:
    back = Image.fromarray(_background(rng, (120, 90, 60)))
    ImageDraw.Draw(back).rectangle((60, 40, 120, 100), fill=(200, 60, 60))
    return np.repeat(np.asarray(back)[None], round(seconds * fps), axis=0)


def text_frames(rng: np.random.Generator, seconds: float, fps: int = 10) -> np.ndarray:
    """Moving video under large caption text covering much of the frame."""
    font = ImageFont.load_default(size=26)
    frames = []
    for frame in moving_frames(rng, seconds, fps, colour=(40, 80, 40)):
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        for row, words in enumerate(("BIG SALE", "TODAY ONLY", "CALL NOW")):
            draw.text((12, 12 + 42 * row), words, font=font, fill=(255, 255, 255), stroke_width=2,
                      stroke_fill=(0, 0, 0))
        frames.append(np.asarray(image))
    return np.stack(frames)


def face_frames(seconds: float, fps: int = 10) -> np.ndarray:
    """A close-up of a real face (the astronaut photograph) drifting slowly, as a speaker
    filling the frame would."""
    from skimage.data import astronaut

    photo = astronaut()  # 512 x 512, the face near rows 70-160, columns 175-265
    frames = []
    for i in range(round(seconds * fps)):
        top, left = 25 + i % 6, 110 + i % 8
        crop = photo[top: top + 180, left: left + 240]
        frames.append(np.asarray(Image.fromarray(crop).resize(SIZE, Image.BILINEAR)))
    return np.stack(frames)


DEMO_CAPTIONS = {
    "varied_en": "A yellow disc rolls across a blue field. The camera pans to the left while it moves.",
    "repeated_en": ("A yellow disc rolls across a blue field. A yellow disc rolls across the blue field. "
                    "The disc rolls."),
    "varied_zh": "一个黄色的圆盘滚过蓝色的田野。镜头随后向左平移。",
    "repeated_zh": "一个黄色的圆盘滚过蓝色的田野。一个黄色的圆盘滚过蓝色的田野。",
}


def write_demo_set(folder: str, seed: int = 0, copies: int = 1) -> str:
    """Writes one clip per case (``copies`` of each, for throughput runs) and a manifest whose
    ``meta.expect`` names the filter that should remove the line (``null``: kept). Returns the
    manifest path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    cases = {
        "moving": (moving_frames(rng, 3.0), None, "varied_en"),
        "still": (still_frames(rng, 3.0), "static", "varied_en"),
        "text": (text_frames(rng, 3.0), "text", "varied_en"),
        "face": (face_frames(3.0), "face", "varied_en"),
        "two_scenes": (np.concatenate([moving_frames(rng, 2.5), moving_frames(rng, 2.5, colour=(170, 40, 90))[:, ::-1]]),
                       None, "varied_zh"),
        "repeated_caption": (moving_frames(rng, 3.0), "caption_repetition", "repeated_en"),
        "repeated_caption_zh": (moving_frames(rng, 3.0), "caption_repetition", "repeated_zh"),
    }
    lines = []
    for copy in range(copies):
        for name, (frames, expect, caption) in cases.items():
            sample_id = name if copies == 1 else f"{name}-{copy}"
            path = os.path.join("videos", f"{sample_id}.mp4")
            write_video(os.path.join(folder, path), frames, fps=10)
            lines.append({"id": sample_id, "video": path, "task": "caption", "caption": DEMO_CAPTIONS[caption],
                          "meta": {"category": name, "expect": expect}})
    manifest = os.path.join(folder, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return manifest
