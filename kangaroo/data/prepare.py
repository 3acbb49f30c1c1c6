"""``kangaroo data prepare``: a manifest to LitData chunks, once, so training never decodes video."""

from __future__ import annotations

import collections
import multiprocessing
import random
import tempfile
from dataclasses import dataclass

from kangaroo import storage
from kangaroo.data.encode import PrepareConfig, SampleEncoder, read_rejects, write_rejects
from kangaroo.data.manifest import Reject, read_manifest
from kangaroo.modules.layout import VisualLayout

REJECTS_FILE = "rejects.jsonl"
FORKSERVER_PRELOAD = ["kangaroo.data.encode", "litdata", "transformers.models.auto.tokenization_auto"]
"""What a forkserver imports once: the encoder, LitData's worker and the tokenizer loader."""


class NothingUsable(Exception):
    """Every sample of the manifest was rejected."""


@dataclass
class PrepareReport:
    output: str
    prepared: int
    rejects: list[Reject]

    def summary(self) -> str:
        reasons = collections.Counter(_reason_kind(r.reason) for r in self.rejects)
        lines = [f"prepared {self.prepared} samples into {self.output}; skipped {len(self.rejects)}"]
        lines += [f"  {count:6d}  {reason}" for reason, count in reasons.most_common()]
        if self.rejects:
            lines.append(f"  details: {storage.join(self.output, REJECTS_FILE)}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def prepare_dataset(
    manifest: str,
    output: str,
    prepare: PrepareConfig,
    layout: VisualLayout,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    allowed_roots: list[str] | None = None,
    start_method: str = "spawn",
) -> PrepareReport:
    """Validates ``manifest``, encodes every usable sample with LitData ``optimize`` into
    ``output`` (a local folder or an ``s3://`` prefix) and lists the rest in
    ``output/rejects.jsonl``. ``layout`` is the stage model's visual layout
    (``kangaroo.modules.builder.visual_layout(config)``).

    Workers start with ``spawn`` (a clean interpreter each, seeing the caller's environment as
    it is now). A process that prepares many datasets in a row, like the recipe runner, passes
    ``forkserver``: one server imports torch, the tokenizer and the model code once and every
    later worker forks from it, where each spawned worker spends seconds importing the same.
    The server keeps the environment it started with, so that process must not change
    credentials or endpoints between calls.

    Raises ``NothingUsable`` when no sample survives, and ``ValueError`` with ``strict`` when
    any sample is rejected or when ``output`` already holds data and ``overwrite`` is off.
    """
    from litdata import optimize

    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be spawn or forkserver, got {start_method!r}")
    if storage.listdir(output):
        if not overwrite:
            raise ValueError(f"{output} is not empty; pass --overwrite to replace it")
        storage.remove(output)
    samples, rejects, seen = [], [], set()
    for item in read_manifest(manifest, allowed_roots):
        if not isinstance(item, Reject) and item.id in seen:
            item = Reject(item.id, "duplicate id: an earlier line has the same id")
        if isinstance(item, Reject):
            rejects.append(item)
        else:
            seen.add(item.id)
            samples.append(item)
    if strict and rejects:
        raise ValueError(f"--strict: {len(rejects)} manifest lines are invalid, first: {rejects[0].to_json()}")
    if not samples:
        raise NothingUsable(f"no usable sample in {manifest} ({len(rejects)} rejected)")
    if prepare.shuffle:
        random.Random(f"{prepare.seed}:order").shuffle(samples)
    with tempfile.TemporaryDirectory(prefix="kangaroo-rejects-") as rejects_dir:
        encoder = SampleEncoder(prepare, layout, rejects_dir)
        # never fork: forking a process whose torch threads already ran can deadlock a worker.
        if start_method == "forkserver":
            multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
        previous = multiprocessing.get_start_method(allow_none=True)
        try:
            optimize(fn=encoder, inputs=samples, output_dir=output, num_workers=workers, chunk_bytes="64MB",
                     start_method=start_method, mode=None)
        finally:  # optimize sets the process-wide start method; later DataLoaders keep the caller's
            multiprocessing.set_start_method(previous, force=True)
        rejects += read_rejects(rejects_dir)
    write_rejects(storage.join(output, REJECTS_FILE), rejects)
    report = PrepareReport(output, _count_samples(output), rejects)
    if report.prepared == 0:
        raise NothingUsable(f"no usable sample in {manifest}; reasons in {storage.join(output, REJECTS_FILE)}")
    if strict and report.rejects:
        raise ValueError(f"--strict: {len(report.rejects)} samples were rejected; see {output}/{REJECTS_FILE}")
    return report


def _count_samples(output: str) -> int:
    import json

    index = storage.join(output, "index.json")
    if not storage.exists(index):
        return 0
    return sum(chunk["chunk_size"] for chunk in json.loads(storage.read_text(index))["chunks"])
