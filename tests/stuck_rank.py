"""A callback that makes one process of a run hang, as a rank does whose peer lost its GPU or
whose storage stalled: the others then wait inside a collective, where no Python code runs.

Used by tests/test_resume.py through ``--trainer.callbacks+=stuck_rank.StuckRank`` with this
folder on ``PYTHONPATH``."""

from __future__ import annotations

import os
import time

from lightning.pytorch.callbacks import Callback


class StuckRank(Callback):
    """At the start of step ``at_step`` process ``rank`` writes ``<default_root_dir>/stuck`` and
    sleeps for an hour."""

    def __init__(self, at_step: int, rank: int = 1) -> None:
        self.at_step, self.rank = at_step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            with open(os.path.join(trainer.default_root_dir, "stuck"), "w") as handle:
                handle.write(str(os.getpid()))
            deadline = time.time() + 3600
            while time.time() < deadline:  # a signal handler runs in between, and the wait goes on
                time.sleep(1)
