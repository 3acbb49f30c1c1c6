"""Streaming prepared LitData chunks against decoding the raw videos per sample.

    python benchmarks/data_throughput.py                # 24 videos of 10 s, 16 frames at 112 px
    python benchmarks/data_throughput.py --videos 64 --frames 32

Writes real h264 videos (25 fps, 320x240) into a temporary folder, prepares them once with
`kangaroo data prepare`'s code path, then times (a) the stage DataModule reading and collating
the chunks and (b) the per-sample decode + sample + resize + tokenize that training would do
without preparation. Both produce the same records; the ratio is from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from kangaroo.data.datamodule import KangarooDataModule
from kangaroo.data.encode import PrepareConfig, SampleEncoder
from kangaroo.data.manifest import read_manifest
from kangaroo.data.prepare import prepare_dataset
from kangaroo.world.tokenizer import build_tiny_tokenizer
from kangaroo.data.video import FrameSampling, write_video
from kangaroo.modules import kangaroo_tiny_config, visual_layout


def make_world(root: str, videos: int, seconds: int) -> str:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(videos):
        frames = np.zeros((seconds * 25, 240, 320, 3), np.uint8)
        for t in range(len(frames)):  # a moving square on a noisy background
            frames[t] = rng.integers(0, 40, (240, 320, 3), dtype=np.uint8)
            x = (t * 4) % 280
            frames[t, 100:140, x : x + 40] = (200, 40 + i * 5 % 200, 40)
        write_video(os.path.join(root, f"v{i}.mp4"), frames, fps=25)
        lines.append(json.dumps({"id": f"v{i}", "video": f"v{i}.mp4", "task": "caption",
                                 "caption": f"A red square moves right, number {i}."}))
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        manifest = make_world(root, args.videos, args.seconds)
        tokenizer_dir = os.path.join(root, "tokenizer")
        build_tiny_tokenizer(["A red square moves right, number. Describe the video."] * 50).save_pretrained(tokenizer_dir)
        prepare = PrepareConfig(tokenizer=tokenizer_dir, max_tokens=4096,
                                sampling=FrameSampling("uniform", num_frames=args.frames, multiple_of=2))
        layout = visual_layout(kangaroo_tiny_config())
        start = time.perf_counter()
        prepare_dataset(manifest, os.path.join(root, "chunks"), prepare, layout)
        prepare_seconds = time.perf_counter() - start

        start = time.perf_counter()
        module = KangarooDataModule(os.path.join(root, "chunks"), max_tokens=4096, packing=False, shuffle=True)
        streamed = sum(len(batch["sample_ids"]) for batch in module.train_dataloader())
        stream_seconds = time.perf_counter() - start

        encoder = SampleEncoder(prepare, layout, rejects_dir=root)
        samples = list(read_manifest(manifest))
        encoder.encode(samples[0])  # loads the tokenizer once, as a worker would
        start = time.perf_counter()
        for sample in samples:
            encoder.encode(sample)
        decode_seconds = time.perf_counter() - start

    frames = args.frames
    stream_rate, decode_rate = streamed / stream_seconds, len(samples) / decode_seconds
    print(f"{args.videos} videos of {args.seconds} s (25 fps, 320x240, h264), {frames} frames at 112 px per sample")
    print(f"  prepare once:          {prepare_seconds:7.2f} s")
    print(f"  streaming chunks:      {stream_rate:8.1f} samples/s {stream_rate * frames:9.1f} frames/s")
    print(f"  decoding raw videos:   {decode_rate:8.1f} samples/s {decode_rate * frames:9.1f} frames/s")
    print(f"  streaming / decoding:  {stream_rate / decode_rate:8.1f}x")


if __name__ == "__main__":
    main()
