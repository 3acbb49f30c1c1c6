"""Peak resident memory of `kangaroo data prepare` against the manifest's length.

    python benchmarks/prepare_memory.py                    # 20,000 and 200,000 lines
    python benchmarks/prepare_memory.py --lines 2000 20000

Writes a few small media files (two images, two 2-second clips) and manifests whose lines reuse
them under distinct ids: mostly text-only conversations of varied length, an image every 40th
line, a clip every 400th, a duplicate id every 1000th and a malformed line every 5000th (so the
rejects path streams too). Each size is prepared in a fresh process (one LitData worker,
``spawn``, the tiny model's layout at raw frames). That process reports its own peak resident
memory (``VmHWM``, exact); the LitData worker processes under it are sampled every 50 ms from
``/proc`` (their summed RSS; ``ru_maxrss`` would not do: a spawned child inherits the parent's
high-water mark across ``exec``). Goal: the largest manifest within 10% of the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

CHILD = """
import json, sys, time
from kangaroo.data.encode import PrepareConfig
from kangaroo.data.prepare import prepare_dataset
from kangaroo.data.video import FrameSampling
from kangaroo.modules import kangaroo_tiny_config, visual_layout
manifest, output, tokenizer = sys.argv[1:4]
prepare = PrepareConfig(tokenizer=tokenizer, max_tokens=512, sampling=FrameSampling("uniform", num_frames=4, multiple_of=2))
start = time.perf_counter()
report = prepare_dataset(manifest, output, prepare, visual_layout(kangaroo_tiny_config()), workers=1)
seconds = time.perf_counter() - start
print(json.dumps({"prepared": report.prepared, "rejected": report.rejected, "seconds": seconds,
                  "main_kb": int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))}))
"""


def write_media(root: str) -> None:
    from PIL import Image

    from kangaroo.data.video import write_video

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(os.path.join(root, f"i{i}.png"))
        write_video(os.path.join(root, f"v{i}.mp4"), rng.integers(0, 255, (20, 96, 128, 3), dtype=np.uint8), fps=10)


def write_manifest(path: str, lines: int) -> None:
    words = "the a red blue circle square moves left right up down slowly quickly and then stops".split()
    with open(path, "w", encoding="utf-8") as out:
        for n in range(lines):
            sample_id = f"s{n - 1}" if n % 1000 == 999 else f"s{n}"
            if n % 5000 == 4999:
                out.write("{not json\n")
                continue
            reply = " ".join(words[(n + k) % len(words)] for k in range(3 + n % 40))
            record = {"id": sample_id, "conversations": [{"role": "user", "content": f"Question {n}?"},
                                                         {"role": "assistant", "content": reply}]}
            if n % 400 == 0:
                record = {"id": sample_id, "video": f"v{n % 2}.mp4", "task": "caption", "caption": reply}
            elif n % 40 == 0:
                record = {"id": sample_id, "image": f"i{n % 2}.png", "task": "caption", "caption": reply}
            out.write(json.dumps(record) + "\n")


def descendants_rss_kb(root: int) -> int:
    """The summed resident memory of every process below ``root`` (not ``root`` itself)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    below, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    total = 0
    for pid in below:
        try:
            with open(f"/proc/{pid}/status") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS")), 0)
        except OSError:
            continue
    return total


def run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Runs ``command``; returns its result and the peak summed RSS of its descendants (kB)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], descendants_rss_kb(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, process.returncode, out, err), peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[20_000, 200_000])
    args = parser.parse_args()
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    results = []
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as root:
        write_media(root)
        tokenizer = os.path.join(root, "tokenizer")
        build_tiny_tokenizer(["the a red blue circle square moves left right up down Question Describe"] * 50
                             ).save_pretrained(tokenizer)
        for lines in args.lines:
            manifest = os.path.join(root, f"m{lines}.jsonl")
            write_manifest(manifest, lines)
            start = time.perf_counter()
            child, workers_kb = run_sampled([sys.executable, "-c", CHILD, manifest, os.path.join(root, f"out{lines}"),
                                             tokenizer])
            if child.returncode:
                sys.exit(child.stderr[-3000:])
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result.update(workers_kb=workers_kb, lines=lines, manifest_mb=os.path.getsize(manifest) / 1e6, wall=time.perf_counter() - start)
            results.append(result)
            print(f"{lines:>9,} lines ({result['manifest_mb']:.1f} MB): prepared {result['prepared']:,}, "
                  f"rejected {result['rejected']:,} in {result['seconds']:.0f} s; peak RSS main "
                  f"{result['main_kb'] / 1024:.0f} MB, workers {result['workers_kb'] / 1024:.0f} MB", flush=True)
    first, last = results[0], results[-1]
    for key in ("main_kb", "workers_kb"):
        print(f"{key[:-3]}: {last['lines']:,} lines / {first['lines']:,} lines = {last[key] / first[key]:.3f}")


if __name__ == "__main__":
    main()
