"""Forward + backward time of the tiny model on the CPU, and the 8B build time on the meta device.

    python benchmarks/model_step.py            # defaults: 5 timed steps after 2 warm-up steps
    python benchmarks/model_step.py --steps 20 --threads 2

Two batch shapes: a stage-2 row (two 8-frame clips at 56 px, no patchify) and a stage-4 packed
row (16, 8 and 2 frames at 112 px with patchify), each sample with 40 answer tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kangaroo.modules import IGNORE_INDEX, kangaroo_8b, kangaroo_tiny


def packed_batch(model, frames_per_sample: list[int], answer_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.vision_tower.image_size
    ids, labels, positions = [], [], []
    for frames in frames_per_sample:
        answer = torch.randint(1, model.visual_tokens.placeholder, (answer_tokens,), generator=g).tolist()
        sample = [1, 2, 3] + model.placeholder_ids(frames) + answer
        ids += sample
        labels += [IGNORE_INDEX] * (len(sample) - answer_tokens) + answer
        positions += list(range(len(sample)))
    total_frames = sum(frames_per_sample)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "pixel_values": torch.randn(total_frames, 3, size, size, generator=g),
        "timestamps": torch.arange(total_frames, dtype=torch.float32) * 0.25,
        "frame_counts": torch.tensor(frames_per_sample),
    }


def time_steps(model, batch, steps: int, warmup: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"tiny model, CPU, {torch.get_num_threads()} threads, forward+backward+AdamW step:")
    shapes = {"stage-2 shape": (56, False, [8, 8]), "stage-4 shape": (112, True, [16, 8, 2])}
    for label, (image_size, patchify, frames) in shapes.items():
        torch.manual_seed(0)
        model = kangaroo_tiny(image_size=image_size, patchify=patchify)
        batch = packed_batch(model, frames, answer_tokens=40)
        seconds = time_steps(model, batch, args.steps, args.warmup)
        tokens = batch["input_ids"].numel()
        median = statistics.median(seconds)
        print(f"  {label}: {tokens} tokens, frames {frames} at {image_size} px: median {median:.3f} s/step "
              f"over {args.steps} steps (min {min(seconds):.3f}, max {max(seconds):.3f}), {tokens / median:.0f} tokens/s")

    start = time.perf_counter()
    with torch.device("meta"):
        big = kangaroo_8b()
    build = time.perf_counter() - start
    params = sum(p.numel() for p in big.parameters())
    print(f"kangaroo-8b on the meta device: {params / 1e9:.2f}B parameters built in {build:.2f} s")


if __name__ == "__main__":
    main()
