"""The stage DataModule: LitData streams of prepared records, packed into rows."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from kangaroo.data.encode import PrepareConfig
from kangaroo.data.streaming import IndexedStreamingDataset, PackingStreamingDataset, dataset_length  # noqa: F401 (re-exported)
from kangaroo.data.even_epochs import EvenBatches
from kangaroo.data.positions import PackedBatches, _saved_workers, reshard_positions
from kangaroo.distributed import per_rank, rank_and_size

log = logging.getLogger(__name__)


class _DropLastIsHandled(logging.Filter):
    """LitData warns that ``drop_last=False`` in a distributed run may stop training at an epoch's
    end (processes with shares of different lengths); the even epochs (``kangaroo.data.even_epochs``)
    are what makes it safe here, so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "disabled the `drop_last` option" not in record.getMessage()


logging.getLogger("litdata.streaming.dataset").addFilter(_DropLastIsHandled())


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
        prepare: how ``kangaroo data prepare --stage`` turns manifests into ``train_dir`` and
            ``val_dir`` (frames, resolution, tokenizer, budget); kept here so that one stage
            file describes both. Its ``max_tokens`` may not exceed ``max_tokens``.
        global_batch: packed rows per optimizer step over all processes. When set,
            ``trainer.accumulate_grad_batches`` follows from it: global_batch / (processes x
            rows_per_batch), which must divide evenly; adding processes then keeps the optimisation.
        epochs: how long the stage trains, in passes over ``train_dir``. When set,
            ``trainer.max_steps`` (and so the warm-up/cosine schedule) follows from it: epochs x the
            optimizer steps of the first epoch at this budget and process count (``kangaroo data
            stats`` prints them; every record's token count is read once and kept in
            ``train_dir/record-tokens.npy`` when the folder is local and writable).
        validate_every_steps: validation cadence in optimizer steps (sets
            ``trainer.val_check_interval``, which Lightning counts in micro-batches).
    """

    def __init__(self, train_dir: str, val_dir: str | None = None, max_tokens: int = 2560, packing: bool = False,
                 rows_per_batch: int = 1, buffer_size: int = 64, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, pad_id: int = 0, prepare: PrepareConfig | None = None, global_batch: int | None = None,
                 epochs: float | None = None, validate_every_steps: int | None = None) -> None:
        super().__init__()
        for name, value in (("global_batch", global_batch), ("epochs", epochs),
                            ("validate_every_steps", validate_every_steps)):
            if value is not None and value <= 0:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if prepare is not None and prepare.max_tokens > max_tokens:
            raise ValueError(f"data.prepare.max_tokens ({prepare.max_tokens}) exceeds the row budget "
                             f"data.max_tokens ({max_tokens}): prepared samples would not fit a row")
        if max_tokens < 1 or rows_per_batch < 1 or buffer_size < 1:
            raise ValueError("data.max_tokens, rows_per_batch and buffer_size must be positive")
        self.save_hyperparameters(ignore=["prepare"])
        self.prepare = prepare
        self._train: PackedBatches | None = None
        self._pending_state: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer is not None:
            self.apply_schedule(self.trainer)

    def apply_schedule(self, trainer: "L.Trainer") -> None:
        """Sets the trainer's accumulation, length and validation cadence from ``global_batch``,
        ``epochs`` and ``validate_every_steps`` (see the class docstring), each stated in the log."""
        hp, processes = self.hparams, trainer.world_size
        if hp.global_batch is not None:
            per_micro_batch = processes * hp.rows_per_batch
            if hp.global_batch % per_micro_batch:
                raise ValueError(f"data.global_batch ({hp.global_batch} rows) is not a multiple of {processes} processes "
                                 f"x data.rows_per_batch {hp.rows_per_batch}: choose a global batch, process count "
                                 "or rows per batch that divide")
            trainer.accumulate_grad_batches = hp.global_batch // per_micro_batch
            rank_zero_info(f"schedule: global batch {hp.global_batch} rows = {processes} processes x "
                           f"{hp.rows_per_batch} rows x {trainer.accumulate_grad_batches} micro-batches "
                           "(accumulate_grad_batches)")
        if hp.epochs is not None:
            # the first process plans (reading every record's token count once, then kept), the others wait
            summary = self._plan_epoch(trainer) if trainer.is_global_zero else None
            rows, records, steps = trainer.strategy.broadcast(summary, src=0)
            trainer.fit_loop.epoch_loop.max_steps = max(1, math.ceil(hp.epochs * steps))
            rank_zero_info(f"schedule: {hp.epochs:g} epoch(s) of {rows} packed rows ({records} records) = {steps} "
                           f"optimizer steps per epoch -> max_steps {trainer.max_steps}")
        if hp.validate_every_steps is not None:
            trainer.val_check_interval = hp.validate_every_steps * trainer.accumulate_grad_batches
            rank_zero_info(f"schedule: validation every {hp.validate_every_steps} optimizer steps "
                           f"({trainer.val_check_interval} micro-batches)")

    def _plan_epoch(self, trainer: "L.Trainer") -> tuple[int, int, int]:
        """(packed rows, records, optimizer steps) of the first epoch of ``train_dir`` on this run."""
        from kangaroo.data.stats import cached_record_tokens, epoch_plan

        hp = self.hparams
        plan = epoch_plan(hp.train_dir, hp.max_tokens, packing=hp.packing, rows_per_batch=hp.rows_per_batch,
                          buffer_size=hp.buffer_size, shuffle=hp.shuffle, seed=hp.seed, num_workers=hp.num_workers,
                          processes=trainer.world_size, nodes=trainer.num_nodes,
                          accumulate=trainer.accumulate_grad_batches, tokens=cached_record_tokens(hp.train_dir))
        return sum(plan.rows), plan.records, plan.steps

    def _batches(self, directory: str, shuffle: bool, train: bool = False) -> PackedBatches:
        hp = self.hparams
        dataset = PackingStreamingDataset(directory, shuffle=shuffle, seed=hp.seed, drop_last=False,
                                          budget=hp.max_tokens, rows_per_batch=hp.rows_per_batch, packing=hp.packing,
                                          buffer_size=hp.buffer_size, pad_id=hp.pad_id)
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # An epoch ends on every process after the same micro-batch, at the end of an accumulation
        # window. One process has no peer to wait for: Lightning's step at its last micro-batch is
        # harmless there, and no empty micro-batch is added.
        several = self.trainer is not None and self.trainer.world_size > 1
        window = self.trainer.accumulate_grad_batches if several and train else 1
        return PackedBatches(dataset, hp.num_workers, track_position=train, pin_memory=pin, multiple_of=window)

    def train_dataloader(self) -> PackedBatches:
        self._train = self._batches(self.hparams.train_dir, self.hparams.shuffle, train=True)
        if self._pending_state is not None:
            positions = self._pending_state["positions_of"]
            rank, size = rank_and_size()
            state = positions[rank] if len(positions) == size else None
            if state is None or not self._train.resumes_exactly(state):
                state = reshard_positions(positions, rank, size, dataset_length(self.hparams.train_dir))
                log.warning("data: a checkpoint of %d processes resumes on %d (loader workers then: %s, now: %d): "
                            "process %d first trains on %d records of the interrupted epoch that no process trained "
                            "on, then goes on with the next epoch", len(positions), size,
                            "/".join(str(_saved_workers(p)) for p in positions if p and "loader" in p) or "-",
                            max(self.hparams.num_workers, 1), rank,
                            sum(end - start for start, end in state.get("remainder", [])))
            self._train.restore(state)
            self._pending_state = None
        processes = self.trainer.world_size if self.trainer is not None else 1
        if processes > 1:
            rank_zero_info(f"data: every process runs as many micro-batches per epoch as the longest of the "
                           f"{processes} shares, rounded up to a multiple of {self._train.multiple_of} "
                           "(accumulate_grad_batches); a shorter share ends with empty micro-batches (no record "
                           "repeated or dropped; their count is logged at each epoch's end)")
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
            # every process's position: resolved in train_dataloader, where the data's length is
            # known should the number of processes or loader workers have changed
            self._pending_state = {"positions_of": state["train_by_rank"]}
        elif state.get("train") is not None:
            self._pending_state = {"positions_of": [state["train"]]}
