"""Sharded checkpoints of ``FSDP2Strategy``, locally and on object stores.

A sharded checkpoint is a torch distributed checkpoint: a folder with one file per process, the
metadata and Lightning's ``meta.pt``, loadable into any number of processes. The folder gets its
``COMPLETE`` marker after every process has written its part, and only such folders are resumed
from. On ``s3://`` every process writes its shard into a staging folder on its machine and
uploads the files it wrote; resuming downloads the folder once per machine. The processes vote
after each step (``kangaroo.distributed.any_process``), so a failure on one fails the save or
the load on all of them at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from kangaroo import storage
from kangaroo.distributed import any_process
from kangaroo.training.checkpoints import COMPLETE_MARKER


class ShardedCheckpoints:
    """The checkpoint I/O of a Lightning strategy that saves torch distributed checkpoints
    (``ModelParallelStrategy``): listed before it among a strategy's bases."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = self.broadcast(str(filepath))
        if storage.is_remote(target):
            return self._save_to_object_store(checkpoint, target, storage_options)
        path = Path(target)
        if self.global_rank == 0 and path.is_dir():
            # a checkpoint saved again under its name (``last.ckpt``): its old shards go first, so
            # none from another number of processes stays behind, and it has no marker until whole
            storage.remove(str(path))
        self.barrier()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.barrier()  # every process has written its shard
        if self.global_rank == 0:
            with open(path / COMPLETE_MARKER, "w") as handle:
                handle.write("complete\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _save_to_object_store(self, checkpoint: dict[str, Any], target: str, storage_options: Any) -> None:
        """A sharded checkpoint on ``s3://``: every process writes its shard into a staging folder
        on its own machine and uploads the files it wrote (``__<rank>_0.distcp``; rank 0 also
        ``.metadata`` and ``meta.pt``), each upload retried like every other
        (``storage.with_retries``). Rank 0 writes ``COMPLETE`` once every process has uploaded.
        The processes vote after each step, so a failure on one (past its retry budget) fails the
        save on every process at once and none waits in a barrier for it. The checkpoints under
        other names stay whole; the one saved again under its name (``last.ckpt``) is removed
        first and has no marker until written again."""
        staging = os.path.join(tempfile.gettempdir(), self.broadcast(f"kangaroo-checkpoint-{uuid.uuid4().hex}"))

        def step(action) -> None:
            error: BaseException | None = None
            try:
                action()
            except Exception as err:  # noqa: BLE001 - decided by every process together
                error = err
            if any_process(error is not None):
                if self.local_rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                if error is not None:
                    raise error
                raise storage.UploadError(f"another process failed while saving {target}; the checkpoints "
                                          "written before are intact")

        def prepare() -> None:
            os.makedirs(staging, exist_ok=True)
            if self.global_rank == 0:
                present = storage.with_retries(lambda: storage.exists(target), target, what="looking up")
                if present:
                    storage.with_retries(lambda: storage.remove(target), target, what="removing")

        def upload() -> None:
            mine = [name for name in sorted(os.listdir(staging))
                    if name.startswith(f"__{self.global_rank}_") or (self.global_rank == 0 and not name.startswith("__"))]
            if not any(name.startswith(f"__{self.global_rank}_") for name in mine):
                raise OSError(f"no shard of process {self.global_rank} in {staging}: the temporary folder "
                              "must be the same path on every machine (TMPDIR)")
            for name in mine:
                storage.upload(os.path.join(staging, name), storage.join(target, name))

        def mark() -> None:
            if self.global_rank == 0:
                storage.write_text(storage.join(target, COMPLETE_MARKER), "complete\n")

        step(prepare)
        # DCP's save is collective and raises on every process when one fails
        super().save_checkpoint(checkpoint, Path(staging), storage_options)
        step(upload)
        step(mark)
        if self.local_rank == 0:  # every process of this machine has uploaded (the votes above)
            shutil.rmtree(staging, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, after a sharded checkpoint folder on an object store is downloaded
        into a staging folder, once per machine (a retried attempt starts from an empty folder)."""
        path = self.broadcast(str(checkpoint_path))
        if not storage.is_remote(path):
            return super().load_checkpoint(path, weights_only)
        staging = os.path.join(tempfile.gettempdir(), self.broadcast(f"kangaroo-checkpoint-{uuid.uuid4().hex}"))
        local = os.path.join(staging, os.path.basename(path.rstrip("/")))

        def fetch() -> None:
            shutil.rmtree(local, ignore_errors=True)
            storage.download(path, local)

        error: BaseException | None = None
        try:
            os.makedirs(staging, exist_ok=True)
            if self.local_rank == 0:
                storage.with_retries(fetch, path, what="downloading")
        except Exception as err:  # noqa: BLE001 - decided by every process together
            error = err
        try:
            if any_process(error is not None):  # also: this machine's copy is whole
                if error is not None:
                    raise error
                raise OSError(f"another machine could not download {path}")
            return super().load_checkpoint(local, weights_only)
        finally:
            self.barrier()
            if self.local_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
