"""Checkpoints that survive preemption.

- ``AtomicCheckpointIO`` writes a local checkpoint beside its final name, syncs it to disk and
  renames it into place, so a write cut off by a kill never carries a checkpoint's name.
  (Lightning's own local save goes through a temporary file in the system temp folder and
  ``shutil.move``, which is a plain copy, cut-off-able, when that folder is on another
  filesystem; and it does not sync.) A remote checkpoint (``s3://``) is written to a local
  temporary file and uploaded as one object, which appears whole or not at all; the upload is
  retried with backoff (``kangaroo.storage.with_retries``) and, past the retry budget,
  stops the run with ``UploadError`` while the previous checkpoints stay as they were.
- ``latest_checkpoint`` finds the newest checkpoint that is whole: a file whose zip directory
  is readable (a truncated ``torch.save`` file loses it), or a directory (sharded checkpoints)
  that holds its ``COMPLETE`` marker. Every one skipped is named in a warning.
- ``PreemptionCheckpoint``: on SIGTERM the run finishes the running optimizer step (the whole
  accumulation window: a checkpoint inside one would lose the gradients of its first
  micro-batches) and a running validation, every process stops after the same step, this
  callback saves ``preempted.ckpt`` and ``kangaroo fit`` exits with ``PREEMPTED_EXIT_CODE``
  (75, ``EX_TEMPFAIL``: try again), after which the same command with ``--ckpt_path=auto``
  continues from it. A process that has not stopped ``grace_s`` after the signal (stuck in a
  collective whose peer died or hangs, where no Python code runs) exits with the same code
  without saving: the newest whole checkpoint is where the next run continues.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import zipfile
from functools import partial
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from kangaroo import storage

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit code of ``kangaroo fit`` (and ``kangaroo recipe run``) stopped by SIGTERM after saving a
checkpoint: run the same command again to continue."""
COMPLETE_MARKER = "COMPLETE"
"""File written last into a directory checkpoint; a directory without it is never resumed from."""
PREEMPTED_NAME = "preempted.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic, durable and, for object stores, retried
    (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with storage.local_output(str(path), durable=True) as local:
            with open(local, "wb") as handle:
                torch.save(checkpoint, handle)

    def remove_checkpoint(self, path) -> None:
        if storage.is_remote(str(path)):
            storage.with_retries(lambda: storage.remove(str(path)), str(path), what="removing")
        else:
            storage.remove(str(path))


class StageCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose existence checks on an object store are retried
    like its uploads (``kangaroo.storage.with_retries``), so that an outage of a few seconds
    does not end the run between two checkpoints. Every stage config uses it; its arguments
    are ``ModelCheckpoint``'s."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # ``save_last: link`` (the stage configs): ``last.ckpt`` is a link to the newest
        # checkpoint, not a second copy of it. An object store has no links, and Lightning
        # refuses the setting there: ``last.ckpt`` is then written whole, as with ``true``.
        root = self.dirpath or trainer.default_root_dir
        if self.save_last == "link" and storage.is_remote(str(root)):
            rank_zero_info(f"checkpoints on {root}: an object store has no links, so last.ckpt is a full copy")
            self.save_last = True
        super().setup(trainer, pl_module, stage)

    def file_exists(self, filepath, trainer) -> bool:
        if not storage.is_remote(str(filepath)):
            return super().file_exists(filepath, trainer)
        exists = storage.with_retries(lambda: self._fs.exists(filepath), str(filepath), what="looking up")
        return trainer.strategy.broadcast(exists)


def is_complete(path: str) -> bool:
    """Whether ``path`` is a whole checkpoint (see the module docstring)."""
    if storage.isdir(path):
        return storage.exists(storage.join(path, COMPLETE_MARKER))
    try:
        with storage.open_file(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(directory: str) -> str | None:
    """The newest whole checkpoint under ``directory`` (a local folder or an ``s3://`` prefix;
    files ``*.ckpt`` and directory checkpoints, newest first by modification time), or None.
    Broken ones are skipped with a warning naming them."""
    found = [p for p in storage.find(directory, ".ckpt")
             if storage.is_remote(p) or not os.path.islink(p)]  # a ``last`` link names a checkpoint listed anyway
    for path in sorted(found, key=_recency, reverse=True):
        if is_complete(path):
            return path
        rank_zero_warn(f"skipping checkpoint {path}: it is incomplete (cut off while written, or "
                       "truncated); resuming from the one before it")
    return None


def _recency(path: str) -> tuple[float, float]:
    """Modification time, then the step in the name: object stores keep whole seconds, and
    several checkpoints of a fast stage share one. On a tie a name with a step wins over one
    without (``last``, ``preempted``), which may hold an older step when its upload failed."""
    match = re.search(r"step=(\d+)", os.path.basename(path.rstrip("/")))
    return storage.mtime(path), float(match.group(1)) if match else -1.0


def checkpoint_dir(trainer) -> str:
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return callback.dirpath
    return storage.join(trainer.default_root_dir, "checkpoints")


class PreemptionCheckpoint(Callback):
    """Stops the fit cleanly on SIGTERM and saves ``preempted.ckpt`` (see the module docstring).

    Lightning's own SIGTERM handling stops after any micro-batch, inside an accumulation window,
    and issues a broadcast from within the signal handler, at whatever point each process
    happens to be; during training this callback's handler replaces it. The handler only notes
    the request (and passes the signal on to the processes this one started); at the end of
    every optimizer step and of every validation all processes agree, in one all-reduce issued
    at the same point on each, whether any of them was asked to stop, and then Lightning's
    stop runs on all of them after that same step.

    Args:
        grace_s: seconds after SIGTERM at which a process still running exits with
            ``PREEMPTED_EXIT_CODE`` without saving (a watchdog thread: it runs while the main
            thread is blocked in a collective). ``null``: wait however long the stop takes.
            It must cover the rest of an accumulation window, a validation running then, and
            the checkpoint write (the default, 300 s, is meant for the 8B stages; a platform's
            SIGKILL may come sooner: GCP spot VMs leave 30 s, AWS spot 2 minutes).
    """

    def __init__(self, grace_s: float | None = 300.0) -> None:
        if grace_s is not None and grace_s <= 0:
            raise ValueError(f"grace_s must be positive or null, got {grace_s}")
        self.grace_s = grace_s
        self._requested = False
        self._step_at_batch_start = 0
        self._inside_window = False
        self._previous_handler: Any = None
        self._watchdog: _SigtermWatchdog | None = None

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def _install(self, trainer) -> None:
        # after Lightning registered its handlers (which it restores at teardown); once per fit
        if self._previous_handler is not None:
            return
        self._requested = bool(trainer.received_sigterm)  # a signal caught by Lightning's handler before
        trainer._signal_connector.received_sigterm = False
        forward = partial(_forward_signal, trainer)
        self._previous_handler = signal.signal(signal.SIGTERM, partial(self._on_sigterm, forward))
        if self.grace_s is not None:
            self._watchdog = _SigtermWatchdog(self.grace_s, forward)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def _close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_sigterm(self, forward, signum, frame) -> None:
        if not self._requested:
            log.warning("SIGTERM: stopping after the running optimizer step, then saving %s", PREEMPTED_NAME)
            if self._watchdog is None:  # else the watchdog has passed it on already
                forward(signum)
        self._requested = True

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._inside_window = trainer.global_step == self._step_at_batch_start
        if not self._inside_window:  # the micro-batch ended a window
            self._agree(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation runs after a micro-batch, which may be inside a window (``val_check_interval``
        # counts micro-batches): a stop there waits for the window's end. Every process ran the
        # same micro-batches, so every process takes the same branch.
        if trainer.state.fn == "fit" and not self._inside_window and trainer.global_step > 0:
            self._agree(trainer)

    def _agree(self, trainer) -> None:
        stop = self._requested
        if trainer.world_size > 1:
            flag = torch.tensor(float(stop), device=trainer.strategy.root_device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if stop:
            # Lightning's flag (it has no public setter): its loops raise SIGTERMException
            # once this step's hooks have run, and on_exception below saves
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            self._close()
            return
        # the watchdog stays on while saving: a save stuck in a collective ends at the bound too
        path = storage.join(checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at step %d; exiting with code %d (run again to continue)",
                    path, trainer.global_step, PREEMPTED_EXIT_CODE)


def _forward_signal(trainer, signum: int) -> None:
    """Passes a signal on to the processes this one started (Lightning's launcher, on one machine)."""
    launcher = trainer.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):
        launcher.kill(signum)


class _SigtermWatchdog:
    """Ends the process ``grace_s`` after a SIGTERM with ``PREEMPTED_EXIT_CODE``.

    A Python signal handler runs only when the main thread is back in the interpreter, never
    while it is blocked in a collective. ``signal.set_wakeup_fd`` makes the C-level handler
    write the signal's number to a socket at once, which this thread waits on."""

    def __init__(self, grace_s: float, forward) -> None:
        self.grace_s, self.forward = grace_s, forward
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sigterm-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._reader], [], [], 0.5)
            if not ready:
                continue
            try:
                received = self._reader.recv(64)
            except OSError:
                return
            if signal.SIGTERM not in received:
                continue
            self.forward(signal.SIGTERM)
            if self._closed.wait(self.grace_s):
                return
            sys.stderr.write(f"kangaroo: still running {self.grace_s:g} s after SIGTERM (stuck in a collective?): "
                             f"exiting with code {PREEMPTED_EXIT_CODE} without saving; the newest whole "
                             "checkpoint is where the next run continues\n")
            sys.stderr.flush()
            os._exit(PREEMPTED_EXIT_CODE)

    def close(self) -> None:
        self._closed.set()
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous_fd)
        self._thread.join(timeout=2)
        self._reader.close()
        self._writer.close()
