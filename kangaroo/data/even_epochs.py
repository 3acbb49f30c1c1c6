"""As many batches on every process: training epochs of equal length, validation passes that end together.

Every process streams its own share of the prepared records, and packing makes the number of
rows in a share depend on the records it happened to draw: on 2 processes the tiny stage 4 at one
row per micro-batch has 200 and 199 micro-batches in its first epoch. Lightning forces an
optimizer step at a process's last batch of an epoch, mid-window; under FSDP2 that step's
collectives (loss normalisation, clipping, the preemption vote) then meet another process's
weight gathers and both wait for ever.

``even_epoch`` makes every process yield the same number of micro-batches in an epoch: the
largest share, rounded up to a multiple of ``accumulate_grad_batches``. A process whose share
ran out yields empty micro-batches (``filler_batch``: one row of padding, no labels, no media)
until every process has run out and the count reaches that multiple. An empty micro-batch runs
the model (the vision tower on a blank frame, see ``KangarooModel.always_run_vision``), so that
it joins every collective, and adds nothing to the loss, the gradients (exactly zero: the loss
of a step is normalised by the step's count of labelled tokens) or any metric. No record is
repeated or dropped; the cost is the compute of the empty micro-batches, reported at every
epoch's end. The epoch ends on every process after the same micro-batch, at the end of an
accumulation window, so the number of optimizer steps is the same everywhere.

Deciding whether any process still has a batch is one small all-reduce per micro-batch, made
by every process at the same point (its batch fetch).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

import torch

from kangaroo.distributed import any_process
from kangaroo.modules.layout import IGNORE_INDEX

log = logging.getLogger(__name__)

FILLER_KEY = "empty_micro_batch"
"""Set (True) in a batch that ``even_epoch`` or ``EvenBatches`` made up: it holds no sample."""


def filler_batch(pad_id: int = 0) -> dict[str, Any]:
    """One row of two padding tokens without labels, media or samples."""
    return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long),
            "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(2).unsqueeze(0), "sample_ids": [], "tasks": [], "categories": [],
            "num_tokens": 0, FILLER_KEY: True}


def even_epoch(batches: Iterable[dict[str, Any]], multiple_of: int = 1, done: int = 0,
               filler: Callable[[], dict[str, Any]] = filler_batch) -> Iterator[dict[str, Any]]:
    """The batches of one epoch of this process's share, then empty ones (``filler``), so that
    every process yields the same number: the most any process has, rounded up to a multiple of
    ``multiple_of`` (the accumulation window). ``done``: micro-batches of this epoch yielded
    before a resume (counted towards the multiple)."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    iterator = iter(batches)
    count = done
    while True:
        batch = next(iterator, None)
        if not any_process(batch is not None):
            break
        count += 1
        yield batch if batch is not None else filler()
    while count % multiple_of:
        count += 1
        yield filler()


class EvenBatches:
    """Validation batches, as many on every process: a process whose share ran out yields a
    filler batch (``filler_batch``) while any other still has one.

    Held-out shares differ in size (the last partial batch is kept, and packing makes the count
    of batches depend on the samples), but every validation step is a collective under FSDP2
    (each unit gathers its parameters) and the metrics sync at the end: a process that stopped
    early would wait in the sync while another waits in a gather. The filler runs the model
    (text only: the vision tower on its blank frame) and adds nothing to any metric.
    """

    def __init__(self, batches: Any, pad_id: int = 0) -> None:
        self.batches = batches
        self.pad_id = pad_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return even_epoch(self.batches, filler=self.filler)

    def filler(self) -> dict[str, Any]:
        return filler_batch(self.pad_id)
