"""What every process of a run asks the others: its rank, whether any process says yes, and the
per-process state in a checkpoint that only rank 0 writes.

Lightning saves the checkpoint of rank 0, but some state differs per process: the data position
(each rank streams its own share, and the packer's buffer holds that rank's records) and the
random generators (drop path draws as many numbers as the rank's batch has samples).
``per_rank`` gathers one value from every process into the list that rank 0 saves, a collective
call that every rank makes at the same point (Lightning builds the checkpoint dict on every
rank); a resumed process takes its own entry back, or, on another number of processes, the data
module reshards the positions (``kangaroo.data.positions.reshard_positions``) and the random
states are left as seeded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_rank(value: Any) -> list[Any]:
    """``value`` of every process, in rank order."""
    _, size = rank_and_size()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective call: every process makes it; on NCCL
    through the current CUDA device)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def exit_after_success() -> None:
    """Ends a process of a multi-process run whose work ended well on every process: the process
    group destroyed, output and log handlers flushed, then ``os._exit(0)``, which skips the
    interpreter's teardown. Left to that teardown, a C++ thread of the communication stack can
    still be joinable when its owner is destroyed, and the process dies with SIGABRT ("terminate
    called without an active exception") after its work is done: a launcher such as ``torchrun``
    then counts the worker failed and waits out its exit barrier on the other nodes. Only on
    success: a process that failed may leave its peers inside a collective, where destroying the
    group hangs. Outside a process group it returns and the interpreter ends as usual."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import logging
    import os
    import sys

    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
