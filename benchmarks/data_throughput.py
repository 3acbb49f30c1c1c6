"""Streaming prepared LitData chunks against decoding the raw videos per sample; the loader
workers' decode rate for compressed stage-4 and stage-5 samples; and the share of a training
step spent waiting on data.

    python benchmarks/data_throughput.py                # 24 videos of 10 s, 16 frames at 112 px
    python benchmarks/data_throughput.py --videos 64 --frames 32
    python benchmarks/data_throughput.py --workers-only     # per-worker decode of 448-px jpeg samples
    python benchmarks/data_throughput.py --wait-share runs/kangaroo-tiny [--steps 60]

``--workers-only``: stage-4 (16-64 frames) and stage-5 (16-160 frames) records of 448-px
camera-like frames stored as jpeg q90 (``benchmarks/prepared_size.py``'s renderer), read through
the stage's dataset by a ``StreamingDataLoader`` with one worker process, which decodes them.

``--wait-share WORKDIR``: the tiny recipe's stage 4 (``kangaroo fit`` on its merged
``stage.yaml`` and prepared data in ``WORKDIR``) for ``--steps`` steps with ``num_workers: 2``
under Lightning's ``SimpleProfiler``: the time in ``train_dataloader_next`` (waiting for the
next batch from the loader's workers, which pack and collate it) over the training epoch's time.

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


def write_stage_records(root: str, frame_range: tuple[int, int], count: int, size: int = 448) -> str:
    """``count`` records of ``frame_range`` frames each (seeded), camera-like, jpeg q90."""
    import sys

    import torch
    from litdata import optimize

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from prepared_size import camera_like

    clip = torch.from_numpy(camera_like(frame_range[1], size, seed=0)).permute(0, 3, 1, 2).contiguous()
    rng = np.random.default_rng(0)
    frames = [int(rng.integers(frame_range[0] // 2, frame_range[1] // 2 + 1)) * 2 for _ in range(count)]
    optimize(fn=_StageRecord(clip), inputs=list(enumerate(frames)), output_dir=root, num_workers=1,
             chunk_bytes="64MB", start_method="spawn", mode=None, verbose=False)
    return root


class _StageRecord:
    def __init__(self, clip) -> None:
        self.clip = clip

    def __call__(self, item: tuple[int, int]) -> dict:
        from kangaroo.data.frames import store_frames

        index, frames = item
        ids = np.arange(frames * 70, dtype=np.int32) % 1000
        return {"id": f"s{index}", "input_ids": ids, "labels": ids, "num_tokens": len(ids),
                **store_frames(self.clip[:frames], "jpeg", 90),
                "timestamps": np.arange(frames, dtype=np.float32), "task": "open_qa", "category": ""}


def worker_rates() -> None:
    from litdata import StreamingDataLoader

    from kangaroo.data.datamodule import IndexedStreamingDataset

    for name, frame_range, count in (("stage 4", (16, 64), 12), ("stage 5", (16, 160), 6)):
        with tempfile.TemporaryDirectory() as root:
            write_stage_records(root, frame_range, count)
            loader = StreamingDataLoader(IndexedStreamingDataset(root, shuffle=False), batch_size=1, num_workers=1,
                                         collate_fn=list)
            iterator = iter(loader)
            first = next(iterator)[0]  # the worker's start-up, excluded
            start = time.perf_counter()
            rest = [record for batch in iterator for record in batch]
            seconds = time.perf_counter() - start
            frames = sum(r["pixels"].shape[0] for r in rest)
            assert first["pixels"].shape[-1] == 448
            print(f"  {name} (448 px, jpeg q90, {frame_range[0]}-{frame_range[1]} frames): one worker "
                  f"{len(rest) / seconds:6.2f} samples/s {frames / seconds:8.1f} frames/s")


def wait_share(workdir: str, steps: int) -> None:
    import re
    import subprocess
    import sys

    stage = os.path.join(workdir, "4-instruction-tuning", "stage.yaml")
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "-m", "kangaroo.cli", "fit", "--config", stage, f"--trainer.max_steps={steps}",
                   "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                   "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.profiler=simple",
                   "--trainer.enable_progress_bar=false", "--data.num_workers=2", "--data.val_dir=null"]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    report = result.stdout + result.stderr

    def total(action: str) -> float:
        match = re.search(rf"{re.escape(action)}\s*\|\s*[\d.e-]+\s*\|\s*\d+\s*\|\s*([\d.e-]+)", report)
        if match is None:
            sys.exit(f"no {action} in the profiler's report:\n{report[-3000:]}")
        return float(match.group(1))

    waiting, epoch = total("train_dataloader_next"), total("run_training_epoch")
    print(f"  tiny stage 4, {steps} steps, num_workers 2: waiting on data {waiting:.2f} s of {epoch:.2f} s "
          f"= {100 * waiting / epoch:.1f}% of the step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--workers-only", action="store_true", help="only the per-worker decode of 448-px samples")
    parser.add_argument("--wait-share", metavar="WORKDIR", help="only the stage-4 wait share, on a tiny recipe run")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if args.workers_only:
        return worker_rates()
    if args.wait_share:
        return wait_share(args.wait_share, args.steps)
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
