"""Bytes per stored 448-px frame, raw against compressed (``prepare.frame_format``), and the mean
absolute pixel error each codec leaves.

    python benchmarks/prepared_size.py [--frames 16] [--size 448]

Content: camera-like clips the script renders (smooth light, soft textured surfaces, moving
objects, sensor noise: a real video is neither flat colour nor white noise), and frames of the
tiny world. Every frame goes through the real path: written as an H.264 mp4, decoded by PyAV,
resized as ``prepare`` does, then stored by ``kangaroo.data.frames.store_frames`` and read back by
``load_frames``. Prints one line per content and format; the goal of the data-at-scale work is
compressed at most 1/8 of raw with an error under 3/255.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def camera_like(frames: int, size: int, seed: int) -> np.ndarray:
    """Smooth light, a soft texture (blurred noise), two moving objects with shading, sensor noise."""
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = np.stack([90 + 80 * x, 80 + 70 * y, 70 + 60 * (1 - x) * y], axis=-1)
    noise = torch.from_numpy(rng.normal(0, 1, (1, 3, size, size)).astype(np.float32))
    kernel = torch.ones(3, 1, 9, 9) / 81
    texture = F.conv2d(F.pad(noise, (4, 4, 4, 4), mode="reflect"), kernel, groups=3)[0].permute(1, 2, 0).numpy()
    base = light + 60 * texture
    out = []
    for t in range(frames):
        frame = base.copy()
        for k, (colour, speed) in enumerate((((200, 60, 50), 0.02), ((40, 90, 180), -0.015))):
            cx, cy = 0.3 + k * 0.4 + speed * t, 0.5 + 0.1 * np.sin(t / 4 + k)
            r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
            blob = np.clip(1 - r / 0.12, 0, 1)[..., None]
            frame = frame * (1 - blob) + np.asarray(colour) * (0.6 + 0.4 * blob) * blob
        out.append((frame + rng.normal(0, 2, frame.shape)).clip(0, 255).astype(np.uint8))
    return np.stack(out)


def tiny_world(frames: int, size: int, seed: int) -> np.ndarray:
    from kangaroo.world.render import background, draw

    rng = np.random.default_rng(seed)
    canvas = background(size, rng)
    out = []
    for t in range(frames):
        frame = canvas.copy()
        draw(frame, "square", "red", size * (0.3 + 0.02 * t), size * 0.5, size * 0.12)
        out.append(frame)
    return np.stack(out)


def through_video(frames: np.ndarray, size: int, root: str) -> torch.Tensor:
    """The frames as a real video: encoded, decoded by PyAV, resized as prepare does."""
    from kangaroo.data.transforms import fit_frames
    from kangaroo.data.video import FrameSampling, read_video, write_video

    path = os.path.join(root, "clip.mp4")
    write_video(path, frames, fps=4)
    clip = read_video(path, FrameSampling("uniform", num_frames=len(frames)))
    return fit_frames(clip.frames, size, "pad")


def main() -> None:
    from kangaroo.data.frames import load_frames, store_frames

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args()
    raw_bytes = 3 * args.size * args.size
    with tempfile.TemporaryDirectory() as root:
        for name, render in (("camera-like", camera_like), ("tiny world", tiny_world)):
            pixels = through_video(render(args.frames, args.size, 0), args.size, root)
            print(f"{name}: raw {raw_bytes:,} bytes per frame")
            for frame_format, quality in (("jpeg", 95), ("jpeg", 90), ("jpeg", 75), ("webp", 90), ("webp", 75)):
                stored = store_frames(pixels, frame_format, quality)
                back = load_frames(dict(stored))["pixels"]
                error = (back.float() - pixels.float()).abs().mean().item()
                per_frame = len(stored["frames"]) / len(pixels)
                print(f"  {frame_format} q{quality}: {per_frame:,.0f} bytes per frame, 1/{raw_bytes / per_frame:.1f} of raw, "
                      f"mean absolute error {error:.2f}/255")


if __name__ == "__main__":
    main()
