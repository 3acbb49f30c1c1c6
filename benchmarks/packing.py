"""Packing efficiency and padded-token fraction: streaming best-fit packing against one sample
per row padded to the batch maximum, on stage-4 and stage-5 shaped length mixes.

    python benchmarks/packing.py
    python benchmarks/packing.py --samples 5000 --buffer 128

Lengths: frames x 128 visual tokens + frames/2 + 2 layout tokens + 40-400 text tokens, with
frames drawn uniformly (even counts) from the stage's range. Only lengths are packed, so the
figures are exact and need no data. The last column is the most any packer that keeps samples
whole could reach on the same lengths (Martello-Toth's lower bound on the rows needed).
"""

from __future__ import annotations

import argparse
import random

from packing_bounds import offline_best_fit_efficiency, packing_efficiency_bound

from kangaroo.data.packing import SequencePacker

MIXES = {
    "stage 4 (16-64 frames, 10K budget)": (16, 64, 10 * 1024),
    "stage 5 (16-160 frames, 22K budget)": (16, 160, 22 * 1024),
}


def lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        frames = rng.randrange(low, high + 1, 2)
        out.append(frames * 128 + frames // 2 + 2 + rng.randrange(40, 400))
    return out


def padded_efficiency(lens: list[int], batch: int) -> float:
    """One sample per row, each batch of ``batch`` rows padded to its longest row."""
    total = 0
    for start in range(0, len(lens), batch):
        group = lens[start : start + batch]
        total += max(group) * len(group)
    return sum(lens) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--buffer", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch for the padding baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'mix':40s} {'packed eff.':>11s} {'padded tok.':>11s} {'offline BFD':>11s} "
          f"{'pad-to-max eff.':>15s} {'padded tok.':>11s} {'bound':>7s}")
    for name, (low, high, budget) in MIXES.items():
        lens = lengths(args.samples, low, high, args.seed)
        packer = SequencePacker(budget, args.buffer)
        for _ in packer.pack({"id": str(i), "num_tokens": n} for i, n in enumerate(lens)):
            pass
        padded = padded_efficiency(lens, args.batch)
        print(f"{name:40s} {packer.efficiency:11.3f} {1 - packer.efficiency:11.3f} "
              f"{offline_best_fit_efficiency(lens, budget):11.3f} {padded:15.3f} {1 - padded:11.3f} "
              f"{packing_efficiency_bound(lens, budget):7.3f}")


if __name__ == "__main__":
    main()
