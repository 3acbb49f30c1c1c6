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
- ``PreemptionCheckpoint``: on SIGTERM Lightning finishes the running step and stops; this
  callback then saves ``preempted.ckpt`` and ``kangaroo fit`` exits with
  ``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: try again), after which the same command with
  ``--ckpt_path=auto`` continues from it.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
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
    """Saves ``preempted.ckpt`` when the fit stops for SIGTERM (see the module docstring)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = storage.join(checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at step %d; exiting with code %d (run again to continue)",
                    path, trainer.global_step, PREEMPTED_EXIT_CODE)
