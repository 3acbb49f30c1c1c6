"""``kangaroo data stats``: what an epoch of prepared data is at a stage's budget, on N processes.

Packing makes the rows of an epoch, and so its optimizer steps, depend on the stage's row budget,
the packer's buffer, the seed, the number of processes and of loader workers: each worker packs
the records LitData hands it. ``epoch_plan`` runs the loader's own dataset
(``PackingStreamingDataset``) for every process and worker of the run in this one process, on
the records' token counts alone (no frame is read), and counts the rows and micro-batches each
yields; the even epochs (``kangaroo.data.even_epochs``) then give every process the longest
share, rounded up to the accumulation window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from litdata import StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from litdata.utilities.env import _DistributedEnv, _WorkerEnv
from tqdm import tqdm

from kangaroo.data.streaming import PackingStreamingDataset, dataset_length


def record_tokens(directory: str) -> np.ndarray:
    """Every record's token count (``num_tokens``), by index: each record is read once."""
    dataset = StreamingDataset(directory)  # its len() is this process's share in a distributed run
    total = dataset_length(directory)
    return np.asarray([int(dataset[i]["num_tokens"]) for i in tqdm(range(total), desc="records", leave=False)],
                      dtype=np.int64)


TOKENS_FILE = "record-tokens.npy"


def cached_record_tokens(directory: str) -> np.ndarray:
    """``record_tokens``, kept for the next call: in ``directory/record-tokens.npy`` for a local
    folder (read again when its ``index.json`` is newer), under ``~/.cache/kangaroo`` keyed by
    the URL and ``index.json`` for an object store."""
    import hashlib
    import os

    from kangaroo import storage
    total = dataset_length(directory)

    if storage.is_remote(directory):
        key = hashlib.sha256((directory + storage.read_text(storage.join(directory, "index.json"))).encode())
        cache = os.path.join(os.path.expanduser("~/.cache/kangaroo/record-tokens"), key.hexdigest()[:32])
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, TOKENS_FILE)
        if os.path.exists(path) and len(cached := np.load(path)) == total:
            return cached
    else:
        path = os.path.join(directory, TOKENS_FILE)
        if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(directory, "index.json")) \
                and len(cached := np.load(path)) == total:
            return cached
    tokens = record_tokens(directory)
    partial = f"{path}.{os.getpid()}.partial.npy"  # every process of a run may write it: each renames its own
    try:
        np.save(partial, tokens)
        os.replace(partial, path)
    except OSError:
        pass  # a read-only folder: counted again next time
    return tokens


class _TokenCounts(PackingStreamingDataset):
    """The loader's dataset on token counts: records are ``{index, id, num_tokens}``, batches are
    counted rows."""

    def __init__(self, *args: Any, tokens: np.ndarray, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens = tokens

    def __getitem__(self, index: ChunkedIndex | int) -> dict[str, Any]:
        i = index.index if isinstance(index, ChunkedIndex) else int(index)
        return {"index": i, "id": str(i), "num_tokens": int(self.tokens[i])}

    def _emit(self) -> None:
        self._ready.append({"rows": len(self._rows), "tokens": sum(r["num_tokens"] for row in self._rows for r in row)})
        self._rows = []


@dataclass
class EpochPlan:
    """One epoch of a stage's data on ``processes`` processes (see ``epoch_plan``)."""

    records: int
    tokens: int
    budget: int
    rows_per_batch: int
    accumulate: int
    rows: list[int] = field(default_factory=list)  # per process
    micro_batches: list[int] = field(default_factory=list)  # per process, before evening

    @property
    def processes(self) -> int:
        return len(self.rows)

    @property
    def micro_batches_per_process(self) -> int:
        """Micro-batches every process runs (the longest share; a multiple of the window on several)."""
        longest = max(self.micro_batches, default=0)
        return longest if self.processes == 1 else math.ceil(longest / self.accumulate) * self.accumulate

    @property
    def steps(self) -> int:
        return math.ceil(self.micro_batches_per_process / self.accumulate)

    @property
    def empty_micro_batches(self) -> int:
        return self.micro_batches_per_process * self.processes - sum(self.micro_batches)

    def summary(self) -> str:
        rows = sum(self.rows)
        lines = [f"records:                     {self.records}",
                 f"tokens:                      {self.tokens}",
                 f"packed rows per epoch:       {rows} of {self.budget} tokens "
                 f"(packing efficiency {self.tokens / max(rows * self.budget, 1):.3f})",
                 f"rows per process:            {'/'.join(map(str, self.rows))}",
                 f"micro-batches per process:   {'/'.join(map(str, self.micro_batches))} "
                 f"({self.rows_per_batch} rows each), run as {self.micro_batches_per_process} on every process",
                 f"empty micro-batches added:   {self.empty_micro_batches}",
                 f"global batch:                {self.processes * self.rows_per_batch * self.accumulate} rows "
                 f"({self.processes} processes x {self.rows_per_batch} rows x {self.accumulate} micro-batches)",
                 f"optimizer steps per epoch:   {self.steps}"]
        return "\n".join(lines)


def epoch_plan(directory: str, budget: int, *, packing: bool = True, rows_per_batch: int = 1, buffer_size: int = 64,
               shuffle: bool = True, seed: int = 0, num_workers: int = 0, processes: int = 1, nodes: int = 1,
               accumulate: int = 1, epoch: int = 1, tokens: np.ndarray | None = None) -> EpochPlan:
    """Rows and micro-batches each of ``processes`` processes (on ``nodes`` machines: LitData
    shuffles within each machine's share from the second epoch on) yields in ``epoch`` (LitData
    counts epochs from 1), exactly as ``KangarooDataModule``'s training loader does."""
    if processes % nodes:
        raise ValueError(f"{processes} processes do not split evenly over {nodes} nodes")
    tokens = record_tokens(directory) if tokens is None else tokens
    workers = max(num_workers, 1)
    plan = EpochPlan(records=len(tokens), tokens=int(tokens.sum()), budget=budget, rows_per_batch=rows_per_batch,
                     accumulate=accumulate)
    for rank in range(processes):
        rows = batches = 0
        for worker in range(workers):
            dataset = _TokenCounts(directory, shuffle=shuffle, seed=seed, drop_last=False, budget=budget,
                                   rows_per_batch=rows_per_batch, packing=packing, buffer_size=buffer_size,
                                   tokens=tokens)
            dataset.distributed_env = _DistributedEnv(world_size=processes, global_rank=rank, num_nodes=nodes)
            dataset._forced_worker_env = _WorkerEnv(world_size=workers, rank=worker)
            dataset.set_batch_size(1)  # as the loader sets them (PackedBatches)
            dataset.set_num_workers(num_workers)
            dataset.set_epoch(epoch)
            for batch in dataset:
                rows += batch["rows"]
                batches += 1
        plan.rows.append(rows)
        plan.micro_batches.append(batches)
    return plan
