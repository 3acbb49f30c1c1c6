"""Exact data positions: the training loader's packed batches with the position a checkpoint
keeps, even epochs on every process, and the resharding of positions when a run resumes on
another number of processes or loader workers."""

from __future__ import annotations

import collections
import copy
import logging
from array import array
from typing import Any, Iterable, Iterator

from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from litdata import StreamingDataLoader

from kangaroo.data.streaming import IndexedStreamingDataset, PackingStreamingDataset
from kangaroo.data.even_epochs import FILLER_KEY, even_epoch, filler_batch
from kangaroo.data.packing import SequencePacker, collate_rows
from kangaroo.distributed import per_rank

log = logging.getLogger(__name__)


class PackedBatches:
    """Iterates the batches the loader's workers pack (``PackingStreamingDataset``), as many on
    every process in every epoch (``kangaroo.data.even_epochs.even_epoch``: a share that ran out
    is followed by empty micro-batches up to the longest share, rounded up to a multiple of
    ``multiple_of``, the accumulation window).

    Its ``position`` is the loader's state plus every worker's position (records drawn, records
    waiting in its packer's buffer): restoring both continues the exact sequence of batches.
    The state is the one after the last batch *trained on* (``consumed``), not the last one
    produced: the trainer fetches a batch ahead, and a checkpoint saved after step k must
    restart at batch k + 1. It also counts the micro-batches of the epoch (``batches``) and says
    whether this process's share had run out (``drained``: the rest of the epoch is empty
    micro-batches) or the epoch had ended (``epoch_finished``).

    The position also holds the epoch and the records of the batches this process received in
    it (``seen``, as index intervals), so that a run resumed on another number of processes or
    loader workers can finish the interrupted epoch with exactly the records no process trained
    on (``reshard_positions``). Such a run first streams its ``remainder`` (sorted indices, read
    by the same number of workers and packed in this process), then goes on with the next epoch
    as usual.
    """

    def __init__(self, dataset: PackingStreamingDataset, num_workers: int = 0, track_position: bool = False,
                 pin_memory: bool = False, multiple_of: int = 1) -> None:
        self.dataset = dataset
        # Its own generator: starting an iterator never draws from the global one, whose state a
        # resumed run restores for the model's own randomness (dropout, drop path).
        self.loader = StreamingDataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=list,
                                          generator=torch.Generator().manual_seed(dataset.seed),
                                          worker_init_fn=_ignore_sigterm if num_workers else None)
        self.packer = SequencePacker(*dataset.packing_args)  # for a remainder only
        self.track_position = track_position
        self.pin_memory = pin_memory
        self.num_workers = num_workers
        self.multiple_of = multiple_of
        self._restored: dict[str, Any] = {}
        self._produced = 0
        self._pending: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._consumed: dict[str, Any] | None = None
        self._workers: dict[int, dict[str, Any]] = {}  # each worker's position after its last batch read
        self._drawn = array("q")  # indices of the records of the batches read in this epoch
        self._continuing = False  # the next pass continues a restored epoch
        self._remainder: list[int] | None = None  # the rest of an epoch begun on another process count
        self._buffer_to_restore: list[int] = []  # a remainder's packer buffer
        self._epoch = 0
        self._in_epoch = 0  # micro-batches yielded in this epoch, empty ones included
        self._drained_from: dict[str, Any] | None = None  # a restored position whose share had run out
        self._last_real: dict[str, Any] | None = None  # the pending state of this pass's last real batch
        self._end: dict[str, Any] | None = None  # this process's position once its share ran out
        self.counts = {"batches": 0, "empty": 0}  # of the last (or running) pass, for the epoch's report

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.track_position:  # held-out batches: EvenBatches evens them
            for batch in self._share():
                yield self._finish(batch)
            return
        done = self._in_epoch if (self._continuing or self._drained_from is not None) else 0
        self._in_epoch, self._last_real, self._end = done, None, None
        self.counts = {"batches": done, "empty": 0}
        share = self._drained_share() if self._drained_from is not None else self._share()
        last: dict[str, Any] | None = None
        for batch in even_epoch(share, self.multiple_of, done, self._filler):
            self._in_epoch += 1
            self.counts["batches"] += 1
            self.counts["empty"] += int(batch.get(FILLER_KEY, False))
            last = self._finish(batch)
            yield last
        # every process ends its epoch here, after the same micro-batch
        self._in_epoch = 0
        if last is not None:
            self._pending_or_consumed(last["data_position"])["epoch_finished"] = True
        report_epoch(per_rank(self.counts), self.multiple_of)

    def _share(self) -> Iterator[dict[str, Any]]:
        """This process's own batches of the epoch (or of the rest of an interrupted one)."""
        if self._remainder is not None:
            yield from self._iter_remainder()
            return
        if not self._continuing:
            self._drawn = array("q")
            self._workers = {}
        self._continuing = False
        for fetched in self.loader:
            batch = fetched[0]
            position = batch.pop("worker_position")
            self._workers[position["worker"]] = position
            self._drawn.extend(batch.pop("record_indices"))
            yield batch
        if self.track_position:
            self._share_ended(None)

    def _drained_share(self) -> Iterator[dict[str, Any]]:
        """A restored epoch whose share had run out: nothing more of it (empty micro-batches follow)."""
        self._share_ended(self._drained_from)
        self._drained_from = None
        return iter(())

    def _share_ended(self, end: dict[str, Any] | None) -> None:
        """Notes the position after this process's last batch of the epoch: the one empty
        micro-batches carry, and the one of that last batch (which the trainer fetched ahead
        and may be saved before any empty one)."""
        if end is None and self._last_real is not None:
            end = self._full_position(self._last_real) if "drawn" in self._last_real else dict(self._last_real)
        if end is None:  # a share without a batch in this epoch
            end = {"loader": _loader_state(self.loader), "workers": dict(self._workers), "buffer": [],
                   "epoch": self.loader.current_epoch, "seen": to_intervals(np.unique(self._drawn))}
        self._end = {k: v for k, v in end.items() if k not in ("drained", "batches", "epoch_finished")}
        if self._last_real is not None:
            self._last_real["drained"] = True

    def _filler(self) -> dict[str, Any]:
        return filler_batch(self.dataset.pad_id)

    def _pending_or_consumed(self, position: int) -> dict[str, Any]:
        return self._pending[position] if position in self._pending else self._consumed

    def _iter_remainder(self) -> Iterator[dict[str, Any]]:
        assert self._remainder is not None
        taken = len(self._drawn) if self._continuing else 0
        self._continuing = False
        self._drawn = array("q", self._remainder[:taken])
        self.packer.buffer = [self.dataset[i] for i in self._buffer_to_restore]
        self._buffer_to_restore = []
        rows: list[list[dict[str, Any]]] = []
        for row in self.packer.pack(self._track(self._read(self._remainder[taken:]))):
            rows.append(row)
            if len(rows) == self.dataset.rows_per_batch:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)
        # the interrupted epoch is done: the next pass is the next epoch
        self._share_ended({"remainder": self._remainder, "taken": len(self._remainder), "buffer": [],
                           "epoch": self._epoch})
        self._remainder = None
        self.loader.current_epoch = self._epoch

    def _track(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            self._drawn.append(record["index"])
            yield record

    def _read(self, indices: list[int]) -> Iterable[dict[str, Any]]:
        """The records at ``indices``, in that order, decoded by the loader's workers."""
        if not self.num_workers:
            return (self.dataset[i] for i in indices)
        return torch.utils.data.DataLoader(_Records(self.dataset, indices), batch_size=None,
                                           num_workers=self.num_workers, worker_init_fn=_ignore_sigterm)

    def _collate(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        batch = collate_rows(rows, self.dataset.pad_id)
        batch["packing_efficiency"] = self.packer.efficiency
        return batch

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.pin_memory:  # page-locked: the copy to the GPU runs asynchronously (non_blocking)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if not self.track_position:
            return batch
        self._produced += 1
        batch["data_position"] = self._produced
        if batch.get(FILLER_KEY):
            assert self._end is not None, "an empty micro-batch before this process's share ended"
            state = {**self._end, "drained": True}
        elif self._remainder is not None:
            state = {"remainder": self._remainder, "taken": len(self._drawn),
                     "buffer": [r["index"] for r in self.packer.buffer], "epoch": self._epoch}
            self._last_real = state
        else:
            state = {"loader": _loader_state(self.loader), "workers": dict(self._workers),
                     "drawn": len(self._drawn), "epoch": self.loader.current_epoch}
            self._last_real = state
        state["batches"] = self._in_epoch
        self._pending[self._produced] = state
        return batch

    def consumed(self, position: int) -> None:
        """Marks every batch up to ``position`` (a batch's ``data_position``) as trained on."""
        while self._pending and next(iter(self._pending)) <= position:
            _, self._consumed = self._pending.popitem(last=False)

    # Named apart from ``state_dict``: Lightning saves the state of a dataloader that has one from
    # rank 0 only and loads it into every rank; the data module keeps one position per rank.
    def position(self) -> dict[str, Any]:
        """The position after the last consumed batch; ``{}`` before the first (start afresh)."""
        consumed = self._consumed
        if consumed is None:
            return self._restored
        if "drawn" in consumed:
            flags = {k: consumed[k] for k in ("drained", "batches", "epoch_finished") if k in consumed}
            return {**self._full_position(consumed), **flags}
        if "remainder" in consumed:
            return {**consumed, "remainder": to_intervals(consumed["remainder"])}
        return dict(consumed)

    def _full_position(self, state: dict[str, Any]) -> dict[str, Any]:
        """A loader batch's pending state as a position: the records drawn up to it, as intervals."""
        drawn = np.frombuffer(self._drawn, dtype=np.int64)[: state["drawn"]]
        buffered = sorted(i for worker in state["workers"].values() for i in worker["buffer"])
        return {"loader": state["loader"], "workers": state["workers"], "buffer": buffered,
                "epoch": state["epoch"], "seen": to_intervals(np.unique(drawn))}

    def restore(self, state: dict[str, Any]) -> None:
        self._restored, self._consumed = dict(state), None
        self._pending.clear()
        self._in_epoch, self._drained_from = 0, None
        if not state:
            return
        finished = bool(state.get("epoch_finished"))  # saved after the epoch's last micro-batch
        if finished and "remainder" in state:  # the next pass is the next epoch
            self._remainder, self._epoch = None, state["epoch"]
            self.loader.current_epoch = self._epoch
            return
        self._in_epoch = int(state.get("batches", 0))
        self._continuing = True
        if "remainder" in state:
            self._remainder = from_intervals(state["remainder"]).tolist()
            self._drawn = array("q", self._remainder[: state["taken"]])
            self._buffer_to_restore = list(state.get("buffer", []))
            self._epoch = state["epoch"]
            return
        loader = copy.deepcopy(state["loader"])
        loader["dataset"]["current_epoch"] = loader["current_epoch"]  # see _loader_state
        self.loader.load_state_dict(loader)
        if finished or state.get("drained"):
            # This process's share of the epoch had run out. LitData would resume inside it (it
            # counts the batches it yielded against the share's records): its next pass must be
            # the next epoch instead.
            self.loader.restore = False
            self._continuing = False
            if not finished:  # empty micro-batches until every process's share has run out
                self._drained_from = state
            else:
                self._in_epoch = 0
            return
        # LitData resumes only inside an epoch: a position at its very end starts the next one
        self._continuing = self.loader.restore
        self._workers = {int(w): p for w, p in state["workers"].items()} if self._continuing else {}
        self.dataset.worker_positions = dict(self._workers)
        self._drawn = array("q", from_intervals(state.get("seen", [])).tolist() if self._continuing else [])
        if not self._continuing:
            self._in_epoch = 0

    def resumes_exactly(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` (this process's own) can be continued as it is: it was written with
        workers packing (``workers``) by as many loader workers as this run has."""
        if not state or "remainder" in state:
            return True
        return "workers" in state and _saved_workers(state) == max(self.num_workers, 1)


def report_epoch(counts: list[dict[str, int]], multiple_of: int) -> None:
    """Logs (on the first process) what evening the epoch's shares cost: the micro-batches every
    process ran, and how many of them were empty (``kangaroo.data.even_epochs``)."""
    if not counts:
        return
    batches, empty = counts[0]["batches"], sum(c["empty"] for c in counts)
    total = batches * len(counts)
    shares = "/".join(str(c["batches"] - c["empty"]) for c in counts)
    rank_zero_info(f"data: the epoch ended after {batches} micro-batches on each of {len(counts)} processes "
                   f"({batches // multiple_of} optimizer steps of {multiple_of}); shares of {shares} real "
                   f"micro-batches, {empty} empty ones added ({100.0 * empty / max(total, 1):.1f}% of the epoch's "
                   "micro-batches); no record repeated or dropped")


def _loader_state(loader: StreamingDataLoader) -> dict[str, Any]:
    """A copy of the loader's state, its dataset's epoch set from the loader's. LitData hands out
    its restored dataset state itself (updated in place at every call) and, with worker
    processes, takes the epoch from the main process's dataset object, which keeps the epoch it
    was built with while a restored state is loaded: a second resume in that epoch would
    replay another epoch's order."""
    state = copy.deepcopy(loader.state_dict())
    state["dataset"]["current_epoch"] = state["current_epoch"]
    return state


def _saved_workers(state: dict[str, Any]) -> int:
    """Loader workers of a saved position (LitData counts the loading process as one when
    there are none)."""
    return int(state["loader"]["dataset"]["num_workers"])


class _Records(torch.utils.data.Dataset):
    def __init__(self, dataset: IndexedStreamingDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[self.indices[i]]


def to_intervals(indices: Any) -> list[list[int]]:
    """Sorted distinct indices as ``[start, end)`` runs: a process's records of an epoch come
    chunk by chunk, so they take a few runs, not one entry each."""
    values = np.asarray(indices, dtype=np.int64)
    if values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = values[np.concatenate(([0], breaks))]
    ends = values[np.concatenate((breaks - 1, [values.size - 1]))] + 1
    return np.stack([starts, ends], axis=1).tolist()


def from_intervals(intervals: list[list[int]]) -> np.ndarray:
    if not intervals:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in intervals])


def reshard_positions(positions: list[dict[str, Any]], rank: int, world: int, total: int) -> dict[str, Any]:
    """This process's position when a run saved by ``len(positions)`` processes resumes on
    ``world``: the records of the interrupted epoch that no process trained on (drawn minus
    those still in a packer's buffer), sorted by index and cut into ``world`` contiguous
    blocks; this process streams block ``rank``, then the next epoch starts as usual. No record
    of that epoch is trained on twice and none is skipped. A checkpoint whose processes were in
    different epochs (one had begun the next) is refused: resume it on its own process count."""
    if not any(positions):
        return {}
    if not all(p and "epoch" in p for p in positions):
        if len(positions) == world:
            raise ValueError("the checkpoint's data positions were written before loader workers packed batches "
                             "(an older version of kangaroo): resume it with that version, or restart the stage")
        raise ValueError(f"the checkpoint holds the data positions of {len(positions)} processes without their "
                         f"records (written by an older version), but this run has {world}: resume with "
                         f"{len(positions)} processes")
    epochs = sorted({p["epoch"] for p in positions})
    if len(epochs) > 1:
        raise ValueError(f"the checkpoint's {len(positions)} processes were in different epochs ({epochs}): "
                         f"resume it with {len(positions)} processes until the next checkpoint, then with {world}")
    if any("remainder" in p for p in positions):
        left = [np.asarray(p["buffer"], dtype=np.int64) for p in positions]
        left += [from_intervals(p["remainder"])[p["taken"]:] for p in positions if "remainder" in p]
        remaining = np.unique(np.concatenate(left))
    else:
        consumed = [np.setdiff1d(from_intervals(p["seen"]), np.asarray(p["buffer"], dtype=np.int64))
                    for p in positions]
        remaining = np.setdiff1d(np.arange(total, dtype=np.int64), np.concatenate(consumed))
    if all(p.get("epoch_finished") for p in positions):  # saved after the epoch's last step: the next one follows
        return {"remainder": [], "taken": 0, "buffer": [], "epoch": epochs[0], "epoch_finished": True}
    block = np.array_split(remaining, world)[rank]
    return {"remainder": to_intervals(block), "taken": 0, "buffer": [], "epoch": epochs[0]}


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers ignore SIGTERM. A preemption signals every process of the job (a process
    group, a container, a Slurm step): a worker ended by it would end the run with "DataLoader
    worker killed" before the stage could finish its step and save. The training process
    stops its workers itself, and a worker whose parent is gone exits on its own."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
