"""Callbacks a stage config can add under ``trainer.callbacks``."""

from __future__ import annotations

import json
import os
from typing import Any

from lightning.pytorch.callbacks import Callback


class SampleLog(Callback):
    """Appends, for every training step, the ids of the samples it trains on to
    ``DIR/samples.rank<R>.jsonl`` (``DIR``: ``path``, default the trainer's
    ``default_root_dir``): one line ``{"step": ..., "epoch": ..., "ids": [...]}`` per micro-batch (an
    empty one, see ``kangaroo.data.even_epochs``, has no ids), flushed at once.
    What a run saw, in order, to audit a data mix or check that a resumed run went on where it
    stopped (a step cut off by a kill is logged twice, the second time by the resumed run)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        directory = self.path or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        line = json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                           "ids": list(batch.get("sample_ids", []))})
        with open(os.path.join(directory, f"samples.rank{trainer.global_rank}.jsonl"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
