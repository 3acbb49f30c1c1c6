"""Streaming best-fit packing of prepared records into rows of at most ``budget`` tokens, and the
collate that turns rows into model inputs."""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Iterator

import torch

from kangaroo.modules.layout import IGNORE_INDEX

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
    are ``-100``. ``pixel_values``: ``(N, 3, s, s)`` uint8 (the model normalises them on its device); ``timestamps``:
    ``(N,)``; ``frame_counts``: ``(M,)`` for the ``M`` samples with media, in token order. A
    preference pair is two samples, chosen then rejected, each with the pair's media;
    ``pairs`` counts them. ``tasks`` and ``categories`` are per sample, ``sample_ids`` per record.
    """
    length = max(pad_to or 0, max(sum(r["num_tokens"] for r in row) for row in rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    pixels, timestamps, frame_counts, ids, tasks, categories = [], [], [], [], [], []
    pairs = 0
    for b, row in enumerate(rows):
        start = 0
        for record in row:
            ids.append(record["id"])
            pair = len(record.get("rejected_input_ids", ())) > 0
            pairs += pair
            # a preference pair: its chosen then its rejected conversation, each a sample of its
            # own (positions from 0, the media again), side by side in the row
            for prefix in ("", "rejected_") if pair else ("",):
                end = start + len(record[f"{prefix}input_ids"])
                input_ids[b, start:end] = torch.as_tensor(record[f"{prefix}input_ids"], dtype=torch.long)
                labels[b, start:end] = torch.as_tensor(record[f"{prefix}labels"], dtype=torch.long)
                position_ids[b, start:end] = torch.arange(end - start)
                tasks.append(record.get("task", ""))
                categories.append(record.get("category", ""))
                if record["pixels"].shape[0]:
                    pixels.append(record["pixels"])
                    timestamps.append(torch.as_tensor(record["timestamps"], dtype=torch.float32))
                    frame_counts.append(record["pixels"].shape[0])
                start = end
        position_ids[b, start:] = torch.arange(length - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_ids": ids,
             "tasks": tasks, "categories": categories, "pairs": pairs,
             "num_tokens": int(sum(r["num_tokens"] for row in rows for r in row))}
    if pixels:
        batch.update(pixel_values=torch.cat(pixels), timestamps=torch.cat(timestamps),
                     frame_counts=torch.tensor(frame_counts))
    return batch
