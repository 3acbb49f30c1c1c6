"""The training stream's dataset: LitData chunks of prepared records, each worker packing and
collating its own records into whole batches, with the positions a resume needs."""

from __future__ import annotations

import collections
import json
from typing import Any

from litdata import StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from kangaroo import storage
from kangaroo.data.frames import load_frames
from kangaroo.data.packing import SequencePacker, collate_rows


class IndexedStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose records carry their global ``index``, so that records held in
    the packer's buffer can be fetched again after a resume."""

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:
        record = load_frames(super().__getitem__(index))  # compressed frames decoded here, in the worker
        record["index"] = index.index if isinstance(index, ChunkedIndex) else int(index)
        return record


class PackingStreamingDataset(IndexedStreamingDataset):
    """Each loader worker packs and collates its own records: an item of this dataset is a whole
    batch of ``rows_per_batch`` rows, ready for the model (uint8 frames and integer tensors).

    LitData gives every worker its own share of the chunks, in an order fixed by the seed and
    the epoch. A batch carries its worker's ``position`` after it: how many records the worker
    has drawn and which wait in its packer's buffer. Resuming, each worker skips the records it
    drew (LitData's own replay, fed with these counts instead of its count of yielded items,
    which are batches here) and refills its buffer; LitData's loader resumes its round robin at
    the worker after the last one read. So the batches come in the same order as without the
    interruption.
    """

    def __init__(self, *args: Any, budget: int, rows_per_batch: int = 1, packing: bool = True,
                 buffer_size: int = 64, pad_id: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing_args = (budget, buffer_size, packing)
        self.rows_per_batch = rows_per_batch
        self.pad_id = pad_id
        self.worker_positions: dict[int, dict[str, Any]] = {}  # set before a resumed epoch's workers start

    def __iter__(self) -> "PackingStreamingDataset":
        resuming = bool(self._state_dict)
        super().__iter__()  # LitData: this worker's chunks, and on a resume our _resume below
        self._packer = SequencePacker(*self.packing_args)
        position = self.worker_positions.get(self.worker_env.rank, {}) if resuming else {}
        self._packer.buffer = [self[i] for i in position.get("buffer", [])]
        self._drawn = int(position.get("drawn", 0))
        self._rows: list[list[dict[str, Any]]] = []
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._exhausted = False
        return self

    def _resume(self, workers_chunks: list[list[int]], workers_intervals: list[Any]) -> None:
        # LitData replays a resumed worker from its count of yielded items, derived from the
        # loader's total under a round robin of one record per item. An item here is a batch of
        # any number of records, so the count of records each worker drew is substituted.
        import litdata.streaming.dataset as streaming

        drawn = {w: int(self.worker_positions.get(w, {}).get("drawn", 0)) for w in range(self.worker_env.world_size)}
        replay, used = streaming._replay_sampling, []
        streaming._replay_sampling = lambda *args: used.append(True) or dict(drawn)
        try:
            super()._resume(workers_chunks, workers_intervals)
        finally:
            streaming._replay_sampling = replay
        if not used:
            raise RuntimeError("this LitData version resumes workers differently: install the tested versions "
                               "(pip install -c constraints.txt)")

    def __next__(self) -> dict[str, Any]:
        while not self._ready:
            if self._exhausted:
                raise StopIteration
            try:
                record = super().__next__()
            except StopIteration:
                self._exhausted = True
                for row in self._packer.flush():
                    self._add_row(row)
                if self._rows:
                    self._emit()
                continue
            self._drawn += 1
            for row in self._packer.add(record):
                self._add_row(row)
        return self._ready.popleft()

    def _add_row(self, row: list[dict[str, Any]]) -> None:
        self._rows.append(row)
        if len(self._rows) == self.rows_per_batch:
            self._emit()

    def _emit(self) -> None:
        # taken when the batch is complete: its records have left the buffer, the next row's
        # records (the packer yields lazily) are still in it
        batch = collate_rows(self._rows, self.pad_id)
        batch["record_indices"] = [record["index"] for row in self._rows for record in row]
        batch["packing_efficiency"] = self._packer.efficiency
        batch["worker_position"] = {"worker": self.worker_env.rank, "drawn": self._drawn,
                                    "buffer": [record["index"] for record in self._packer.buffer]}
        self._rows = []
        self._ready.append(batch)


def dataset_length(directory: str) -> int:
    """Records in a prepared dataset, from its ``index.json`` (every chunk's ``chunk_size``)."""
    index = json.loads(storage.read_text(storage.join(directory, "index.json")))
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
