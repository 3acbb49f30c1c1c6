"""The stage DataModule: LitData streams of prepared records, packed into rows."""

from __future__ import annotations

import collections
import json
import logging
from array import array
from typing import Any, Iterable, Iterator

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from kangaroo import storage
from kangaroo.data.encode import PrepareConfig
from kangaroo.data.frames import load_frames
from kangaroo.data.packing import SequencePacker, collate_rows
from kangaroo.distributed import per_rank, world
from kangaroo.modules.layout import IGNORE_INDEX

log = logging.getLogger(__name__)


class IndexedStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose records carry their global ``index``, so that records held in
    the packer's buffer can be fetched again after a resume."""

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:
        record = load_frames(super().__getitem__(index))  # compressed frames decoded here, in the worker
        record["index"] = index.index if isinstance(index, ChunkedIndex) else int(index)
        return record


class PackedBatches:
    """Iterates batches of ``rows_per_batch`` packed rows over a ``StreamingDataLoader``.

    Its ``position`` is the loader's state plus the indices of the records waiting in the
    packer's buffer: restoring both continues the exact sequence of batches. The state is the one
    after the last batch *trained on* (``consumed``), not the last one produced: the trainer
    fetches a batch ahead, and a checkpoint saved after step k must restart at batch k + 1.

    The position also holds the epoch and the records this process drew in it (``seen``, as
    index intervals), so that a run resumed on another number of processes can finish the
    interrupted epoch with exactly the records no process trained on (``reshard_positions``).
    Such a run first streams its ``remainder`` (sorted indices, read through a plain loader with
    the same workers), then goes on with the next epoch as usual.
    """

    def __init__(self, dataset: IndexedStreamingDataset, budget: int, rows_per_batch: int = 1,
                 packing: bool = True, buffer_size: int = 64, num_workers: int = 0, pad_id: int = 0,
                 track_position: bool = False, pin_memory: bool = False) -> None:
        self.dataset = dataset
        # Its own generator: starting an iterator never draws from the global one, whose state a
        # resumed run restores for the model's own randomness (dropout, drop path).
        self.loader = StreamingDataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=list,
                                          generator=torch.Generator().manual_seed(dataset.seed),
                                          worker_init_fn=_ignore_sigterm if num_workers else None)
        self.packer = SequencePacker(budget, buffer_size, packing)
        self.rows_per_batch = rows_per_batch
        self.pad_id = pad_id
        self.track_position = track_position
        self.pin_memory = pin_memory
        self._restored: dict[str, Any] = {}
        self._buffer_to_restore: list[int] = []
        self._produced = 0
        self._pending: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._consumed: dict[str, Any] | None = None
        self.num_workers = num_workers
        self._drawn = array("q")  # indices of the records drawn in this epoch, in order
        self._continuing = False  # the next pass continues a restored epoch
        self._remainder: list[int] | None = None  # the rest of an epoch begun on another process count
        self._epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.packer.buffer = [self.dataset[i] for i in self._buffer_to_restore]
        self._buffer_to_restore = []
        if self._remainder is not None:
            taken = len(self._drawn) if self._continuing else 0
            self._drawn = array("q", self._remainder[:taken])
            source: Iterable[dict[str, Any]] = self._read(self._remainder[taken:])
        else:
            if not self._continuing:
                self._drawn = array("q")
            source = (record for fetched in self.loader for record in fetched)
        self._continuing = False
        records = self._track(source)
        rows: list[list[dict[str, Any]]] = []
        for row in self.packer.pack(records):
            rows.append(row)
            if len(rows) == self.rows_per_batch:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)
        if self._remainder is not None:  # the interrupted epoch is done: the next pass is the next epoch
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
        batch = collate_rows(rows, self.pad_id)
        batch["packing_efficiency"] = self.packer.efficiency
        if self.pin_memory:  # page-locked: the copy to the GPU runs asynchronously (non_blocking)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if not self.track_position:
            return batch
        self._produced += 1
        batch["data_position"] = self._produced
        buffer = [r["index"] for r in self.packer.buffer]
        if self._remainder is not None:
            self._pending[self._produced] = {"remainder": self._remainder, "taken": len(self._drawn),
                                             "buffer": buffer, "epoch": self._epoch}
        else:
            self._pending[self._produced] = {"loader": self.loader.state_dict(), "buffer": buffer,
                                             "drawn": len(self._drawn), "epoch": self.loader.current_epoch}
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
        if "remainder" in consumed:
            return {**consumed, "remainder": to_intervals(consumed["remainder"])}
        drawn = np.frombuffer(self._drawn, dtype=np.int64)[: consumed["drawn"]]
        return {"loader": consumed["loader"], "buffer": consumed["buffer"], "epoch": consumed["epoch"],
                "seen": to_intervals(np.unique(drawn))}

    def restore(self, state: dict[str, Any]) -> None:
        self._restored, self._consumed = dict(state), None
        self._pending.clear()
        self._buffer_to_restore = list(state.get("buffer", []))
        if not state:
            return
        self._continuing = True
        if "remainder" in state:
            self._remainder = from_intervals(state["remainder"]).tolist()
            self._drawn = array("q", self._remainder[: state["taken"]])
            self._epoch = state["epoch"]
            return
        self.loader.load_state_dict(state["loader"])
        self._drawn = array("q", from_intervals(state.get("seen", [])).tolist())


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


def dataset_length(directory: str) -> int:
    """Records in a prepared dataset, from its ``index.json`` (every chunk's ``chunk_size``)."""
    index = json.loads(storage.read_text(storage.join(directory, "index.json")))
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])


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
    block = np.array_split(remaining, world)[rank]
    return {"remainder": to_intervals(block), "taken": 0, "buffer": [], "epoch": epochs[0]}


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers ignore SIGTERM. A preemption signals every process of the job (a process
    group, a container, a Slurm step): a worker ended by it would end the run with "DataLoader
    worker killed" before the stage could finish its step and save. The training process
    stops its workers itself, and a worker whose parent is gone exits on its own."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EvenBatches:
    """Validation batches, as many on every process: a process whose share ran out yields a
    filler batch (one row of padding, no labels, no samples) while any other still has one.

    Held-out shares differ in size (the last partial batch is kept, and packing makes the count
    of batches depend on the samples), but every validation step is a collective under FSDP2
    (each unit gathers its parameters) and the metrics sync at the end: a process that stopped
    early would wait in the sync while another waits in a gather. The filler runs the model
    (text only: the vision tower on its blank frame) and adds nothing to any metric. Deciding
    whether to go on is itself one small all-reduce per step, made by every process.
    """

    def __init__(self, batches: Any, pad_id: int = 0) -> None:
        self.batches = batches
        self.pad_id = pad_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = iter(self.batches)
        while True:
            batch = next(iterator, None)
            if not _any_process(batch is not None):
                return
            yield batch if batch is not None else self.filler()

    def filler(self) -> dict[str, Any]:
        return {"input_ids": torch.full((1, 2), self.pad_id, dtype=torch.long),
                "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
                "position_ids": torch.arange(2).unsqueeze(0), "sample_ids": [], "tasks": [], "categories": [],
                "num_tokens": 0}


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective call: every process makes it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class KangarooDataModule(L.LightningDataModule):
    """Prepared chunks (``kangaroo data prepare``) for one stage.

    Args:
        train_dir: prepared training data, a local folder or ``s3://`` URL.
        val_dir: prepared held-out data (optional).
        max_tokens: the row budget in tokens (the stage's LLM sequence length).
        packing: pack several records per row (stages 4-5); otherwise one record per row.
        rows_per_batch: rows per micro-batch.
        buffer_size: records the packer chooses from.
        num_workers: loader worker processes.
        shuffle: shuffle the training stream (seeded by ``seed``).
        pad_id: token id of padding (its labels are ignored).
        prepare: how ``kangaroo data prepare --config`` turns manifests into ``train_dir`` and
            ``val_dir`` (frames, resolution, tokenizer, budget); kept here so that one stage
            file describes both. Its ``max_tokens`` may not exceed ``max_tokens``.
    """

    def __init__(self, train_dir: str, val_dir: str | None = None, max_tokens: int = 2560, packing: bool = False,
                 rows_per_batch: int = 1, buffer_size: int = 64, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, pad_id: int = 0, prepare: PrepareConfig | None = None) -> None:
        super().__init__()
        if prepare is not None and prepare.max_tokens > max_tokens:
            raise ValueError(f"data.prepare.max_tokens ({prepare.max_tokens}) exceeds the row budget "
                             f"data.max_tokens ({max_tokens}): prepared samples would not fit a row")
        if max_tokens < 1 or rows_per_batch < 1 or buffer_size < 1:
            raise ValueError("data.max_tokens, rows_per_batch and buffer_size must be positive")
        self.save_hyperparameters(ignore=["prepare"])
        self.prepare = prepare
        self._train: PackedBatches | None = None
        self._pending_state: dict[str, Any] | None = None

    def _batches(self, directory: str, shuffle: bool, train: bool = False) -> PackedBatches:
        hp = self.hparams
        dataset = IndexedStreamingDataset(directory, shuffle=shuffle, seed=hp.seed, drop_last=False)
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return PackedBatches(dataset, hp.max_tokens, hp.rows_per_batch, hp.packing, hp.buffer_size,
                             hp.num_workers, hp.pad_id, track_position=train, pin_memory=pin)

    def train_dataloader(self) -> PackedBatches:
        self._train = self._batches(self.hparams.train_dir, self.hparams.shuffle, train=True)
        if self._pending_state is not None:
            state = self._pending_state
            if "positions_of" in state:  # saved by another number of processes
                rank, size = world()
                state = reshard_positions(state["positions_of"], rank, size, dataset_length(self.hparams.train_dir))
                log.warning("data: a checkpoint of %d processes resumes on %d: process %d first trains on %d records "
                            "of the interrupted epoch that no process trained on, then goes on with the next epoch",
                            len(self._pending_state["positions_of"]), size, rank,
                            sum(end - start for start, end in state.get("remainder", [])))
            self._train.restore(state)
            self._pending_state = None
        return self._train

    def val_dataloader(self) -> EvenBatches | list:
        if self.hparams.val_dir is None:
            return []
        return EvenBatches(self._batches(self.hparams.val_dir, shuffle=False), self.hparams.pad_id)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs when a batch is about to be trained on (after the trainer's read-ahead).
        position = batch.pop("data_position", None) if isinstance(batch, dict) else None
        if position is not None and self.trainer is not None and self.trainer.training and self._train is not None:
            self._train.consumed(position)
        return batch

    def state_dict(self) -> dict[str, Any]:
        # every process streams its own share: one position per rank (see kangaroo.distributed)
        return {"train_by_rank": per_rank(self._train.position())} if self._train is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_by_rank" in state:
            positions = state["train_by_rank"]
            rank, size = world()
            # another number of processes: resolved once the data's length is known (train_dataloader)
            self._pending_state = positions[rank] if len(positions) == size else {"positions_of": positions}
        else:
            self._pending_state = state.get("train")
