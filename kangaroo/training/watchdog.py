"""A stuck collective is an error, not a silence.

A process blocked in a collective (its peer lost its GPU, hangs in storage, or was stopped) runs
no Python code, and the process group's own timeout is 30 minutes by default (gloo) and ends it
with a message that says nothing of the training. ``StallWatchdog`` is a thread that every
Lightning hook of the fit tells what the process is doing; when one phase has lasted longer than
its bound, it writes which process is stuck, at which step and in what, ends the processes this
one started, and exits with ``STALLED_EXIT_CODE``. Checkpoints are written atomically (and
sharded ones carry their ``COMPLETE`` marker last), so the newest whole checkpoint stays intact
and ``--ckpt_path=auto`` continues from it.

Lightning's own ``timeout`` of a strategy is the process group's; this bound is tighter and
speaks of the run. Written by hand: neither torch (its NCCL watchdog knows collectives, not
steps, and gloo has none) nor Lightning offers a progress watchdog.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

STALLED_EXIT_CODE = 76
"""Exit code of ``kangaroo fit`` (and of the recipe's stage) ended by ``StallWatchdog``: a
process made no progress for longer than its bound. Running the same command with
``--ckpt_path=auto`` continues from the newest whole checkpoint, once the cause (a lost node, a
hung file system) is gone."""


class StallWatchdog(Callback):
    """Ends the run when a process makes no progress for ``timeout_s`` seconds.

    Progress is any hook of the fit: a micro-batch starting or ending, an optimizer step, a
    validation batch, a checkpoint save. A phase that outlasts its bound is reported with the
    process's rank, the step and the phase, the processes this one started are killed, and the
    process exits with ``STALLED_EXIT_CODE`` (76).

    Args:
        timeout_s: the bound on one micro-batch (forward, backward, the fetch of the next one and
            the collectives in between), an optimizer step or a validation batch; ``null``
            turns the watchdog off. The default (5 minutes) is many times an 8B micro-batch of
            22K tokens on an H100; raise it for slower steps.
        save_timeout_s: the bound on writing one checkpoint (a sharded 8B checkpoint uploaded to
            an object store, retries included, takes longer than a step).
    """

    def __init__(self, timeout_s: float | None = 300.0, save_timeout_s: float = 1800.0) -> None:
        for name, value in (("timeout_s", timeout_s), ("save_timeout_s", save_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.timeout_s = timeout_s
        self.save_timeout_s = save_timeout_s
        # (phase, step, bound, since), replaced whole so that the thread never reads a mix
        self._state: tuple[str, int, float | None, float] = ("starting", 0, timeout_s, time.monotonic())
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._where = ""
        self._kill_children: Any = None

    # -- what the process is doing ---------------------------------------------------------

    def _beat(self, phase: str, trainer, bound: float | None = None) -> None:
        self._state = (phase, trainer.global_step, bound if bound is not None else self.timeout_s, time.monotonic())

    def on_train_start(self, trainer, pl_module) -> None:
        self._start(trainer)
        self._beat("fetching the first micro-batch", trainer)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        window = trainer.accumulate_grad_batches
        self._beat(f"the forward and backward of micro-batch {batch_idx % window + 1} of {window} "
                   f"(batch {batch_idx} of epoch {trainer.current_epoch})", trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._beat("the optimizer step (loss normalisation across processes, gradient clipping, update)", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._beat("fetching the next micro-batch (the loader, and every process agreeing whether any still has "
                   "data) or the hooks after a step (the preemption vote, a checkpoint)", trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start(trainer)
        self._beat("starting validation", trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._beat(f"validation batch {batch_idx}", trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._beat("fetching the next validation batch", trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._beat("the end of validation (metrics synchronised across processes)", trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._beat(f"saving a checkpoint at step {trainer.global_step}", trainer, bound=self.save_timeout_s)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):  # Lightning calls no teardown after an exception
            self.close()
            return
        # PreemptionCheckpoint saves in its own on_exception, before or after this one: bounded as a save
        self._beat("stopping for SIGTERM (saving a checkpoint)", trainer, bound=self.save_timeout_s)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    # -- the thread --------------------------------------------------------------------------

    def _start(self, trainer) -> None:
        if self.timeout_s is None or self._thread is not None:
            return
        self._where = f"process {trainer.global_rank} of {trainer.world_size}"
        launcher = trainer.strategy.launcher
        self._kill_children = (lambda: launcher.kill(signal.SIGKILL)) if getattr(launcher, "procs", None) else None
        self._closed.clear()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.wait(1.0):
            phase, step, bound, since = self._state
            waited = time.monotonic() - since
            if bound is None or waited <= bound:
                continue
            sys.stderr.write(
                f"kangaroo: {self._where} made no progress for {waited:.0f} s (bound {bound:g} s) at step "
                f"{step}, in {phase}. Another process probably stopped answering (a lost node or "
                "GPU, a hung file system) and this one waits in a collective. Exiting with code "
                f"{STALLED_EXIT_CODE}; the newest whole checkpoint is intact: run the same command with "
                "--ckpt_path=auto to continue from it\n")
            sys.stderr.flush()
            if self._kill_children is not None:  # the other processes of this machine (Lightning's launcher)
                try:
                    self._kill_children()
                except Exception:  # noqa: BLE001 - exiting regardless
                    pass
            os._exit(STALLED_EXIT_CODE)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
