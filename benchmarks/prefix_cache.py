"""Time to first token of a conversation's second question about a long clip, with and without
the prefix cache (``kangaroo.inference.prefix_cache``: the frames decoded once, the prompt's KV
cache kept), and whether the replies are the same.

    python benchmarks/prefix_cache.py [--frames 160] [--repeats 3]

The tiny model (random weights, 112 px, the tiny recipe's tower) on a ``--frames`` clip sampled
whole. Time to first token = building the prompt (decoding the video, or not) and generating one
token; the median of ``--repeats`` conversations. ``kangaroo chat``, ``serve`` and ``demo`` share
this ``Generator``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from benchmarks.generation import tiny_folder
    from kangaroo.data.video import FrameSampling, write_video
    from kangaroo.inference import Generator, load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16, help="the first reply's length (default 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        loaded = load_pretrained(tiny_folder(root, 112, 128, 4))
        sampling = FrameSampling("uniform", num_frames=args.frames, multiple_of=2)
        first = [{"role": "user", "content": "What happens in the video?"}]

        def conversation(generator: Generator, clip: str) -> tuple[float, float, list[int], list[int], int]:
            started = time.perf_counter()
            prompt = generator.prompt(first, clip, sampling=sampling)
            generator.generate([prompt], max_new_tokens=1, temperature=0)
            ttft1 = time.perf_counter() - started
            reply = generator.generate([prompt], max_new_tokens=args.new_tokens, temperature=0)[0]
            second = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
            started = time.perf_counter()
            prompt2 = generator.prompt(second, clip, sampling=sampling)
            generator.generate([prompt2], max_new_tokens=1, temperature=0)
            ttft2 = time.perf_counter() - started
            answer = generator.generate([prompt2], max_new_tokens=args.new_tokens, temperature=0)[0]
            return ttft1, ttft2, reply.token_ids, answer.token_ids, len(prompt2.input_ids)

        results = {"cached": [], "uncached": []}
        same = True
        for repeat in range(args.repeats):
            clip = os.path.join(root, f"clip{repeat}.mp4")  # a new clip each time: the first question always decodes
            write_video(clip, (np.random.default_rng(repeat).random((args.frames, 96, 128, 3)) * 255).astype(np.uint8),
                        fps=4)
            cached = conversation(Generator(loaded), clip)
            uncached = conversation(Generator(loaded, cache_mb=0), clip)
            results["cached"].append(cached)
            results["uncached"].append(uncached)
            same &= cached[2:4] == uncached[2:4]
        for name, runs in results.items():
            first_ttft = statistics.median(r[0] for r in runs)
            second_ttft = statistics.median(r[1] for r in runs)
            print(f"{name:>8}: time to first token {first_ttft:.3f} s (first question), {second_ttft:.3f} s (second, "
                  f"{runs[0][4]} prompt tokens): {first_ttft / second_ttft:.1f}x")
        print(f"{args.frames}-frame clip, median of {args.repeats}; replies with the cache "
              f"{'identical to' if same else 'DIFFERENT FROM'} those without")


if __name__ == "__main__":
    main()
