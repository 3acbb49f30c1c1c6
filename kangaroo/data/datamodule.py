"""The stage DataModule: LitData streams of prepared records, packed into rows."""

from __future__ import annotations

import collections
from typing import Any, Iterator

import lightning as L
import torch
import torch.distributed as dist
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from kangaroo.data.encode import PrepareConfig
from kangaroo.data.frames import load_frames
from kangaroo.data.packing import SequencePacker, collate_rows
from kangaroo.distributed import own_entry, per_rank
from kangaroo.modules.layout import IGNORE_INDEX


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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.packer.buffer = [self.dataset[i] for i in self._buffer_to_restore]
        self._buffer_to_restore = []
        records = (record for fetched in self.loader for record in fetched)
        rows: list[list[dict[str, Any]]] = []
        for row in self.packer.pack(records):
            rows.append(row)
            if len(rows) == self.rows_per_batch:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)

    def _collate(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        batch = collate_rows(rows, self.pad_id)
        batch["packing_efficiency"] = self.packer.efficiency
        if self.pin_memory:  # page-locked: the copy to the GPU runs asynchronously (non_blocking)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if not self.track_position:
            return batch
        self._produced += 1
        batch["data_position"] = self._produced
        self._pending[self._produced] = {"loader": self.loader.state_dict(),
                                         "buffer": [r["index"] for r in self.packer.buffer]}
        return batch

    def consumed(self, position: int) -> None:
        """Marks every batch up to ``position`` (a batch's ``data_position``) as trained on."""
        while self._pending and next(iter(self._pending)) <= position:
            _, self._consumed = self._pending.popitem(last=False)

    # Named apart from ``state_dict``: Lightning saves the state of a dataloader that has one from
    # rank 0 only and loads it into every rank; the data module keeps one position per rank.
    def position(self) -> dict[str, Any]:
        """The position after the last consumed batch; ``{}`` before the first (start afresh)."""
        if self._consumed is not None:
            return self._consumed
        return self._restored

    def restore(self, state: dict[str, Any]) -> None:
        self._restored, self._consumed = dict(state), None
        self._pending.clear()
        self._buffer_to_restore = list(state.get("buffer", []))
        if state:
            self.loader.load_state_dict(state["loader"])


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
            self._train.restore(self._pending_state)
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
            self._pending_state = own_entry(state["train_by_rank"], "data positions")
        else:
            self._pending_state = state.get("train")
