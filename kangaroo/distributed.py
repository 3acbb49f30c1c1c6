"""Per-process state in a checkpoint that only rank 0 writes.

Lightning saves the checkpoint of rank 0, but some state differs per process: the data position
(each rank streams its own share, and the packer's buffer holds that rank's records) and the
random generators (drop path draws as many numbers as the rank's batch has samples).
``per_rank`` gathers one value from every process into the list that rank 0 saves, a collective
call that every rank makes at the same point (Lightning builds the checkpoint dict on every
rank); a resumed process takes its own entry back, or, on another number of processes, the data
module reshards the positions (``kangaroo.data.datamodule.reshard_positions``) and the random
states are left as seeded.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_rank(value: Any) -> list[Any]:
    """``value`` of every process, in rank order."""
    _, size = world()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered
