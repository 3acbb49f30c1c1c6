"""Curation throughput: videos per second per worker for each filter, then the whole default
pipeline in 1 and in N processes.

    python benchmarks/curate_throughput.py
    python benchmarks/curate_throughput.py --copies 10 --workers 2

The videos are the demo set (``kangaroo.world.demo_clips``: 192x144, 10 fps, 3-5 s H.264 clips,
one per case a filter looks for) written ``--copies`` times into a temporary folder. Each
filter runs alone, in this process, over every item it applies to; its one-off start (loading
a detection model or jieba's dictionary) is timed apart, on a first pass over one copy of the
set, and left out of the rate. Decoding is part of
every video filter's time, so larger or longer videos lower every rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from kangaroo.curate import Item, curate, default_filters
from kangaroo.world.demo_clips import write_demo_set
from kangaroo.curate.filters import DatasetFilter


def per_filter(manifest: str, workspace: str) -> list[tuple[str, int, float, float]]:
    """``(name, items, seconds, start seconds)`` per sample filter."""
    base = os.path.dirname(manifest)
    records = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    items = [Item(r["id"], r, os.path.join(base, r["video"])) for r in records]
    rows = []
    for f in default_filters():
        if isinstance(f, DatasetFilter):
            continue
        f.setup(workspace)
        todo = [i for i in items if f.applies(i)]
        started = time.perf_counter()
        for item in todo[:7]:  # one of each case: loads the detector, imports the library
            f.check(item)
        start = time.perf_counter() - started
        started = time.perf_counter()
        for item in todo:
            f.check(item)
        rows.append((f.name, len(todo), time.perf_counter() - started, start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=12, help="copies of the 7-clip demo set (default 12)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes for the pool run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kangaroo-curate-bench-") as folder:
        manifest = write_demo_set(os.path.join(folder, "demo"), copies=args.copies)
        count = 7 * args.copies
        print(f"{count} demo videos (192x144, 10 fps, 3-5 s), one process per filter:")
        print(f"  {'filter':<20}{'items':>7}{'videos/s/worker':>17}{'ms/video':>10}{'first pass s':>14}")
        for name, items, seconds, start in per_filter(manifest, os.path.join(folder, "clips")):
            print(f"  {name:<20}{items:>7}{items / seconds:>17.1f}{1000 * seconds / items:>10.1f}{start:>14.2f}")
        rates = {}
        for workers in sorted({1, args.workers}):
            out = os.path.join(folder, f"out-{workers}", "kept.jsonl")
            started = time.perf_counter()
            report = curate(manifest, out, workers=workers, progress=False)
            seconds = time.perf_counter() - started
            rates[workers] = count / seconds
            print(f"whole default pipeline, {workers} worker(s): {count} lines in {seconds:.1f} s, "
                  f"{rates[workers]:.2f} lines/s, kept {report.data['kept_lines']} lines")
        if len(rates) > 1:
            print(f"pool speed-up with {args.workers} workers: x{rates[args.workers] / rates[1]:.2f} "
                  f"(same run; includes each worker's start)")


if __name__ == "__main__":
    main()
