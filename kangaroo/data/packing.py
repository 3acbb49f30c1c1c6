"""Streaming best-fit packing of prepared records into rows of at most ``budget`` tokens, and the
collate that turns rows into model inputs."""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Iterator

import torch

from kangaroo.data.transforms import normalize
from kangaroo.modules.loss import IGNORE_INDEX

Record = dict[str, Any]


def take_best_fit(lengths: list[int], budget: int) -> list[int]:
    """Indices of one row: the longest item first, then repeatedly the longest that still fits.

    ``lengths`` must be sorted ascending; the returned indices are in the order chosen.
    """
    chosen = [len(lengths) - 1]
    space = budget - lengths[-1]
    taken = {chosen[0]}
    while space > 0:
        i = bisect.bisect_right(lengths, space) - 1
        while i >= 0 and i in taken:
            i -= 1
        if i < 0:
            break
        chosen.append(i)
        taken.add(i)
        space -= lengths[i]
    return chosen


class SequencePacker:
    """Fills rows from a buffer of ``buffer_size`` records, best fit, never splitting a record.

    With ``packing=False`` every record is its own row (stages 1-3). Records longer than
    ``budget`` are an error: ``kangaroo data prepare`` already fitted or rejected them.
    Tracks the packing efficiency: tokens placed / (rows x budget).
    """

    def __init__(self, budget: int, buffer_size: int = 64, packing: bool = True) -> None:
        if budget < 1 or buffer_size < 1:
            raise ValueError(f"packing needs budget >= 1 and buffer_size >= 1, got {budget}, {buffer_size}")
        self.budget = budget
        self.buffer_size = buffer_size if packing else 1
        self.packing = packing
        self.buffer: list[Record] = []
        self.tokens = 0
        self.rows = 0

    @property
    def efficiency(self) -> float:
        return self.tokens / (self.rows * self.budget) if self.rows else 0.0

    def add(self, record: Record) -> Iterator[list[Record]]:
        """Buffers ``record`` and yields the rows that became ready."""
        if record["num_tokens"] > self.budget:
            raise ValueError(f"record {record['id']!r} has {record['num_tokens']} tokens, over the budget {self.budget}")
        self.buffer.append(record)
        while len(self.buffer) >= self.buffer_size:
            yield self._emit()

    def flush(self) -> Iterator[list[Record]]:
        while self.buffer:
            yield self._emit()

    def pack(self, records: Iterable[Record]) -> Iterator[list[Record]]:
        for record in records:
            yield from self.add(record)
        yield from self.flush()

    def _emit(self) -> list[Record]:
        self.buffer.sort(key=lambda r: r["num_tokens"])
        chosen = take_best_fit([r["num_tokens"] for r in self.buffer], self.budget) if self.packing else [0]
        row = [self.buffer[i] for i in chosen]
        for i in sorted(chosen, reverse=True):
            del self.buffer[i]
        self.rows += 1
        self.tokens += sum(r["num_tokens"] for r in row)
        return row


def collate_rows(rows: list[list[Record]], pad_id: int = 0, pad_to: int | None = None) -> dict[str, Any]:
    """Rows of records -> model inputs.

    ``input_ids``, ``labels``, ``position_ids``: ``(b, L)`` with ``L`` the longest row (or
    ``pad_to``); positions restart at 0 for every record and for the padding tail, whose labels
    are ``-100``. ``pixel_values``: ``(N, 3, s, s)`` float, CLIP-normalised; ``timestamps``:
    ``(N,)``; ``frame_counts``: ``(M,)`` for the ``M`` records with media, in token order.
    """
    length = max(pad_to or 0, max(sum(r["num_tokens"] for r in row) for row in rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    pixels, timestamps, frame_counts, ids, tasks, categories = [], [], [], [], [], []
    for b, row in enumerate(rows):
        start = 0
        for record in row:
            end = start + record["num_tokens"]
            input_ids[b, start:end] = torch.as_tensor(record["input_ids"], dtype=torch.long)
            labels[b, start:end] = torch.as_tensor(record["labels"], dtype=torch.long)
            position_ids[b, start:end] = torch.arange(end - start)
            ids.append(record["id"])
            tasks.append(record.get("task", ""))
            categories.append(record.get("category", ""))
            if record["pixels"].shape[0]:
                pixels.append(record["pixels"])
                timestamps.append(torch.as_tensor(record["timestamps"], dtype=torch.float32))
                frame_counts.append(record["pixels"].shape[0])
            start = end
        position_ids[b, start:] = torch.arange(length - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_ids": ids,
             "tasks": tasks, "categories": categories,
             "num_tokens": int(sum(r["num_tokens"] for row in rows for r in row))}
    if pixels:
        batch.update(pixel_values=normalize(torch.cat(pixels)), timestamps=torch.cat(timestamps),
                     frame_counts=torch.tensor(frame_counts))
    return batch


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
    import bisect
    import math

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
