"""The stage DataModule: LitData streams of prepared records, packed into rows."""

from __future__ import annotations

from typing import Any, Iterator

import lightning as L
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from kangaroo.data.encode import PrepareConfig
from kangaroo.data.packing import SequencePacker, collate_rows


class IndexedStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose records carry their global ``index``, so that records held in
    the packer's buffer can be fetched again after a resume."""

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:
        record = super().__getitem__(index)
        record["index"] = index.index if isinstance(index, ChunkedIndex) else int(index)
        return record


class PackedBatches:
    """Iterates batches of ``rows_per_batch`` packed rows over a ``StreamingDataLoader``.

    Its ``state_dict`` is the loader's state plus the indices of the records waiting in the
    packer's buffer: restoring both continues the exact sequence of batches.
    """

    def __init__(self, dataset: IndexedStreamingDataset, budget: int, rows_per_batch: int = 1,
                 packing: bool = True, buffer_size: int = 64, num_workers: int = 0, pad_id: int = 0) -> None:
        self.dataset = dataset
        self.loader = StreamingDataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=list)
        self.packer = SequencePacker(budget, buffer_size, packing)
        self.rows_per_batch = rows_per_batch
        self.pad_id = pad_id
        self._restored_buffer: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.packer.buffer = [self.dataset[i] for i in self._restored_buffer]
        self._restored_buffer = []
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
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "buffer": [r["index"] for r in self.packer.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._restored_buffer = list(state["buffer"])


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

    def _batches(self, directory: str, shuffle: bool) -> PackedBatches:
        hp = self.hparams
        dataset = IndexedStreamingDataset(directory, shuffle=shuffle, seed=hp.seed, drop_last=False)
        return PackedBatches(dataset, hp.max_tokens, hp.rows_per_batch, hp.packing, hp.buffer_size,
                             hp.num_workers, hp.pad_id)

    def train_dataloader(self) -> PackedBatches:
        self._train = self._batches(self.hparams.train_dir, self.hparams.shuffle)
        if self._pending_state is not None:
            self._train.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train

    def val_dataloader(self) -> PackedBatches | list:
        if self.hparams.val_dir is None:
            return []
        return self._batches(self.hparams.val_dir, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self._train.state_dict()} if self._train is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = state.get("train")
