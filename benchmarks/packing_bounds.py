"""Reference figures for the streaming packer, used by ``benchmarks/packing.py`` and its tests:
best-fit-decreasing over a whole list at once, and an upper bound on any whole-sample packer.
Kept out of ``kangaroo.data.packing``, the training hot path's module, because no training run
calls them."""

from __future__ import annotations

import bisect
import math


def offline_best_fit_efficiency(lengths: list[int], budget: int) -> float:
    """Efficiency of best-fit-decreasing over the whole list at once: the reference a streaming
    packer with a bounded buffer is measured against (it sees every length in advance)."""
    rows: list[int] = []
    for length in sorted(lengths, reverse=True):
        fitting = [i for i, used in enumerate(rows) if used + length <= budget]
        if fitting:
            best = max(fitting, key=lambda i: rows[i])
            rows[best] += length
        else:
            rows.append(length)
    return sum(lengths) / (len(rows) * budget)


def packing_efficiency_bound(lengths: list[int], budget: int) -> float:
    """The most any packer that keeps samples whole can reach on ``lengths``: total tokens over
    ``budget`` times a lower bound on the rows needed. The bound is Martello and Toth's L2 for
    bin packing (1990): for every threshold ``a`` up to half the budget, a sample longer than
    ``budget - a`` shares its row with no sample of at least ``a``, two samples longer than half
    the budget never share a row, and the samples between ``a`` and half the budget fill the
    rows of those longer ones before opening rows of their own. Hand-written: Python packages
    for bin packing give heuristics or a MIP solver (far heavier than a bound needs), not this
    bound, which is a few sums over a sorted list."""
    ordered = sorted(lengths)
    if not ordered:
        return 0.0
    if ordered[-1] > budget:
        raise ValueError(f"a sample of {ordered[-1]} tokens does not fit a budget of {budget}")
    prefix = [0]
    for length in ordered:
        prefix.append(prefix[-1] + length)

    def count_sum(low: float, high: float, closed_low: bool = True) -> tuple[int, int]:
        """Number and sum of lengths in [low, high] (or (low, high] when not closed_low)."""
        start = (bisect.bisect_left if closed_low else bisect.bisect_right)(ordered, low)
        stop = bisect.bisect_right(ordered, high)
        return max(0, stop - start), prefix[max(stop, start)] - prefix[start]

    rows = math.ceil(prefix[-1] / budget)
    half = budget / 2
    for a in {0, *(length for length in ordered if length <= half)}:
        over, _ = count_sum(budget - a, budget, closed_low=False)
        big, big_sum = count_sum(half, budget - a, closed_low=False)
        _, small_sum = count_sum(a, half)
        spill = small_sum - (big * budget - big_sum)
        rows = max(rows, over + big + max(0, math.ceil(spill / budget)))
    return prefix[-1] / (rows * budget)
