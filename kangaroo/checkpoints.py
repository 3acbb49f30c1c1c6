"""Checkpoints that survive preemption.

- ``AtomicCheckpointIO`` writes a local checkpoint beside its final name, syncs it to disk and
  renames it into place, so a write cut off by a kill never carries a checkpoint's name.
  (Lightning's own local save goes through a temporary file in the system temp folder and
  ``shutil.move``, which is a plain copy, cut-off-able, when that folder is on another
  filesystem; and it does not sync.) Object stores are left to Lightning: an S3 object appears
  whole or not at all.
- ``latest_checkpoint`` finds the newest checkpoint that is whole: a file whose zip directory
  is readable (a truncated ``torch.save`` file loses it), or a directory (sharded checkpoints)
  that holds its ``COMPLETE`` marker. Every one skipped is named in a warning.
- ``PreemptionCheckpoint``: on SIGTERM Lightning finishes the running step and stops; this
  callback then saves ``preempted.ckpt`` and ``kangaroo fit`` exits with
  ``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: try again), after which the same command with
  ``--ckpt_path=auto`` continues from it.
"""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit code of ``kangaroo fit`` (and ``kangaroo recipe run``) stopped by SIGTERM after saving a
checkpoint: run the same command again to continue."""
COMPLETE_MARKER = "COMPLETE"
"""File written last into a directory checkpoint; a directory without it is never resumed from."""
PREEMPTED_NAME = "preempted.ckpt"


def _is_remote(path: str) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        partial = path + ".partial"
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the rename itself reaches the disk
        finally:
            os.close(descriptor)


def is_complete(path: str) -> bool:
    """Whether ``path`` is a whole checkpoint (see the module docstring)."""
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, COMPLETE_MARKER))
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(directory: str) -> str | None:
    """The newest whole checkpoint under ``directory`` (files ``*.ckpt`` and directory
    checkpoints, newest first by modification time), or None. Broken ones are skipped with a
    warning naming them."""
    found = [p for p in glob.glob(os.path.join(directory, "**", "*.ckpt"), recursive=True)
             if not os.path.islink(p)]  # a ``last`` link names a checkpoint listed anyway
    for path in sorted(found, key=os.path.getmtime, reverse=True):
        if is_complete(path):
            return path
        rank_zero_warn(f"skipping checkpoint {path}: it is incomplete (cut off while written, or "
                       "truncated); resuming from the one before it")
    return None


def checkpoint_dir(trainer) -> str:
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return callback.dirpath
    return os.path.join(trainer.default_root_dir, "checkpoints")


class PreemptionCheckpoint(Callback):
    """Saves ``preempted.ckpt`` when the fit stops for SIGTERM (see the module docstring)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = os.path.join(checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at step %d; exiting with code %d (run again to continue)",
                    path, trainer.global_step, PREEMPTED_EXIT_CODE)
