"""``kangaroo data prepare``: a manifest to LitData chunks, once, so training never decodes video.

The manifest is streamed, never held: a first pass validates every line and records the usable
ones (id, a shuffle key, the line's byte offset) in an on-disk SQLite index, whose primary key
refuses duplicate ids and whose ``ORDER BY`` sorts the output order on disk. LitData ``optimize``
then gets blocks of positions in that order; each worker re-reads its lines from the manifest
by offset. Memory stays flat in the manifest's length (``benchmarks/prepare_memory.py``); the
index takes about 50 bytes of local disk per line. SQLite comes with Python and is built for
exactly this (a disk-backed B-tree and external sort), so none of it is written here.

Several machines prepare one dataset with ``shard=(K, N)``: every machine reads the whole
manifest (JSON only, no media) and so computes the same order and the same duplicate rule; shard
K encodes the K-th of N contiguous slices of that order into ``OUTPUT/parts/K-of-N``, and
``merge_parts`` joins the parts with LitData's ``merge_datasets`` into one dataset, sample for
sample the one a single pass writes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

from kangaroo import storage
from kangaroo.data.encode import PrepareConfig, SampleEncoder
from kangaroo.data.manifest import ManifestSample, Reject, manifest_roots, parse_line
from kangaroo.modules.layout import VisualLayout

REJECTS_FILE = "rejects.jsonl"
PART_FILE = "part.json"
"""Written last into a shard's part folder: the part is complete."""
PARTS_DIR = "parts"
BLOCK = 64
"""At most this many positions per LitData input item (fewer when a worker would get under 4)."""
FORKSERVER_PRELOAD = ["kangaroo.data.encode", "litdata", "transformers.models.auto.tokenization_auto"]
"""What a forkserver imports once: the encoder, LitData's worker and the tokenizer loader."""


class NothingUsable(Exception):
    """Every sample of the manifest was rejected."""


@dataclass
class PrepareReport:
    output: str
    prepared: int
    reasons: collections.Counter = field(default_factory=collections.Counter)
    """Rejected samples by reason (the text before the first colon)."""

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        lines = [f"prepared {self.prepared} samples into {self.output}; skipped {self.rejected}"]
        lines += [f"  {count:6d}  {reason}" for reason, count in self.reasons.most_common()]
        if self.rejected:
            lines.append(f"  details: {storage.join(self.output, REJECTS_FILE)}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def part_dir(output: str, shard: tuple[int, int]) -> str:
    return storage.join(output, PARTS_DIR, f"{shard[0]}-of-{shard[1]}")


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
    shard: tuple[int, int] | None = None,
) -> PrepareReport:
    """Validates ``manifest``, encodes every usable sample with LitData ``optimize`` into
    ``output`` (a local folder or an ``s3://`` prefix) and lists the rest in
    ``output/rejects.jsonl``. ``layout`` is the stage model's visual layout
    (``kangaroo.modules.builder.visual_layout(config)``).

    ``shard=(K, N)`` prepares only the K-th of N slices into ``output/parts/K-of-N`` (see the
    module's text); ``merge_parts(output)`` joins them once all N are written. Manifest-level
    rejects (bad lines, duplicates) go to the shard whose number is the line number modulo N,
    so the N parts list each reject once.

    Workers start with ``spawn`` (a clean interpreter each, seeing the caller's environment as
    it is now). A process that prepares many datasets in a row, like the recipe runner, passes
    ``forkserver``: one server imports torch, the tokenizer and the model code once and every
    later worker forks from it, where each spawned worker spends seconds importing the same.
    The server keeps the environment it started with, so that process must not change
    credentials or endpoints between calls.

    Raises ``NothingUsable`` when no sample survives, and ``ValueError`` with ``strict`` when
    any sample is rejected or when the output already holds data and ``overwrite`` is off.
    """
    from litdata import optimize

    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be spawn or forkserver, got {start_method!r}")
    index, count = shard or (0, 1)
    if not 0 <= index < count or (shard and count < 2):
        raise ValueError(f"shard {index}/{count}: K must lie in 0..N-1 and N be at least 2")
    target = part_dir(output, (index, count)) if shard else output
    if storage.listdir(target):
        if not overwrite:
            raise ValueError(f"{target} is not empty; pass --overwrite to replace it")
        storage.remove(target)
    with tempfile.TemporaryDirectory(prefix="kangaroo-prepare-") as scratch:
        rejects_dir = os.path.join(scratch, "rejects")
        os.makedirs(rejects_dir)
        db = os.path.join(scratch, "order.sqlite")
        usable, first_reject, fingerprint = index_manifest(manifest, db, prepare, allowed_roots,
                                                           os.path.join(rejects_dir, "0-manifest.jsonl"),
                                                           (index, count), layout)
        if strict and first_reject is not None:
            raise ValueError(f"--strict: manifest lines are invalid, first: {first_reject.to_json()}")
        if usable == 0:
            raise NothingUsable(f"no usable sample in {manifest}")
        start, end = usable * index // count, usable * (index + 1) // count
        block = max(1, min(BLOCK, -(-(end - start) // (4 * max(1, workers)))))  # every worker gets blocks
        blocks = [(a, min(a + block, end)) for a in range(start, end, block)]
        if blocks:
            encoder = SpooledEncoder(SampleEncoder(prepare, layout, rejects_dir), db, manifest, allowed_roots)
            # never fork: forking a process whose torch threads already ran can deadlock a worker.
            if start_method == "forkserver":
                multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
            previous = multiprocessing.get_start_method(allow_none=True)
            try:
                # keep_data_ordered: each worker writes its own contiguous share, so index.json lists the
                # samples in the sorted order (a shared work queue would interleave them run to run). One
                # worker keeps the order either way; LitData 0.2.76 uploads no chunk to an object store
                # with keep_data_ordered (its per-worker upload path), so there the writers share a queue.
                writers = min(workers, len(blocks))
                ordered = writers > 1 and not storage.is_remote(target)
                optimize(fn=encoder, inputs=blocks, output_dir=target, num_workers=writers, chunk_bytes="64MB",
                         start_method=start_method, mode=None, keep_data_ordered=ordered)
            finally:  # optimize sets the process-wide start method; later DataLoaders keep the caller's
                multiprocessing.set_start_method(previous, force=True)
        reasons = collect_rejects(rejects_dir, storage.join(target, REJECTS_FILE))
    report = PrepareReport(target, _count_samples(target), reasons)
    if not shard and report.prepared == 0:
        raise NothingUsable(f"no usable sample in {manifest}; reasons in {storage.join(output, REJECTS_FILE)}")
    if strict and report.rejected:
        raise ValueError(f"--strict: {report.rejected} samples were rejected; see {target}/{REJECTS_FILE}")
    if shard:  # last: the part is complete
        storage.write_text(storage.join(target, PART_FILE), json.dumps(
            {"shard": index, "of": count, "usable": usable, "fingerprint": fingerprint, "prepared": report.prepared,
             "rejected": report.rejected}) + "\n")
    return report


def order_key(prepare: PrepareConfig, sample_id: str, line: int) -> int:
    """Where a sample goes in the output: a seeded hash of its id (``shuffle``), else its line."""
    if not prepare.shuffle:
        return line
    digest = hashlib.blake2b(f"{prepare.seed}:order:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def index_manifest(manifest: str, db: str, prepare: PrepareConfig, allowed_roots: list[str] | None,
                   rejects_path: str, shard: tuple[int, int] = (0, 1),
                   layout: VisualLayout | None = None) -> tuple[int, Reject | None, str]:
    """The first pass: every line validated, usable ones recorded in ``db`` by output position
    (table ``ordered``: ``pos`` from 0, ``id``, ``offset``, ``line``), the shard's manifest
    rejects appended to ``rejects_path``. Returns the usable count, the first reject of any
    shard, and a fingerprint of the ordered ids with the prepare settings and the layout (the
    parts of one dataset must agree on it)."""
    from tqdm import tqdm

    base, roots = manifest_roots(manifest, allowed_roots)
    connection = sqlite3.connect(db)
    connection.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;
        CREATE TABLE lines (id TEXT PRIMARY KEY, key INTEGER NOT NULL, offset INTEGER NOT NULL,
                            line INTEGER NOT NULL) WITHOUT ROWID;
    """)
    first_reject = None
    size = os.path.getsize(manifest)
    with open(manifest, "rb") as lines, open(rejects_path, "a", encoding="utf-8") as rejects, \
            tqdm(total=size, unit="B", unit_scale=True, desc="reading manifest", mininterval=2.0,
                 disable=size < 1 << 24, file=sys.stderr) as progress:
        offset, number = 0, 0
        for raw in lines:
            number += 1
            here, offset = offset, offset + len(raw)
            progress.update(len(raw))
            if not raw.strip():
                continue
            item = _parse(raw, number, base, roots)
            if not isinstance(item, Reject):
                inserted = connection.execute("INSERT OR IGNORE INTO lines VALUES (?, ?, ?, ?)",
                                              (item.id, order_key(prepare, item.id, number), here, number))
                if inserted.rowcount == 1:
                    continue
                item = Reject(item.id, "duplicate id: an earlier line has the same id")
            first_reject = first_reject or item
            if number % shard[1] == shard[0]:
                rejects.write(item.to_json() + "\n")
    connection.executescript("""
        CREATE TABLE ordered (pos INTEGER PRIMARY KEY, id TEXT NOT NULL, offset INTEGER NOT NULL,
                              line INTEGER NOT NULL);
        INSERT INTO ordered (pos, id, offset, line)
            SELECT ROW_NUMBER() OVER (ORDER BY key, line) - 1, id, offset, line FROM lines;
        DROP TABLE lines;
    """)
    connection.commit()
    settings = {k: v for k, v in dataclasses.asdict(prepare).items() if k != "tokenizer"}  # paths differ by machine
    digest = hashlib.blake2b(repr((settings, layout)).encode(), digest_size=16)
    usable = 0
    for (sample_id,) in connection.execute("SELECT id FROM ordered ORDER BY pos"):
        digest.update(sample_id.encode() + b"\n")
        usable += 1
    connection.close()
    return usable, first_reject, digest.hexdigest()


def _parse(raw: bytes, number: int, base: str, roots: list[str]) -> ManifestSample | Reject:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Reject(f"line {number}", f"not UTF-8: {err.reason} at byte {err.start}")
    item = parse_line(text, number, base, roots)
    try:
        item.id.encode("utf-8")
    except UnicodeEncodeError:  # JSON may spell a lone surrogate ("\ud800"), which no file or key can hold
        return Reject(f"line {number}", "the id is not valid Unicode (a lone surrogate)")
    return item


class SpooledEncoder:
    """LitData's ``fn``: a block ``(start, end)`` of output positions in, the records of those
    samples out (a generator; rejects go where ``SampleEncoder`` puts them). Each worker opens
    the index and the manifest itself, once."""

    def __init__(self, encoder: SampleEncoder, db: str, manifest: str, allowed_roots: list[str] | None) -> None:
        self.encoder = encoder
        self.db = db
        self.manifest = manifest
        self.base, self.roots = manifest_roots(manifest, allowed_roots)
        self._connection: sqlite3.Connection | None = None
        self._lines = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_connection": None, "_lines": None}

    def samples(self, block: tuple[int, int]) -> Iterator[ManifestSample]:
        if self._connection is None:
            self._connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
            self._lines = open(self.manifest, "rb")
        rows = self._connection.execute("SELECT id, offset, line FROM ordered WHERE pos >= ? AND pos < ? ORDER BY pos",
                                        block).fetchall()
        for sample_id, offset, number in rows:
            self._lines.seek(offset)
            item = _parse(self._lines.readline(), number, self.base, self.roots)
            if isinstance(item, Reject) or item.id != sample_id:  # the file changed since the first pass
                raise RuntimeError(f"{self.manifest} changed while it was being prepared (line {number} no longer "
                                   f"holds {sample_id!r}); prepare again")
            yield item

    def __call__(self, block: tuple[int, int]) -> Iterator[dict]:
        for sample in self.samples(block):
            record = self.encoder(sample)
            if record is not None:
                yield record


def collect_rejects(directory: str, destination: str) -> collections.Counter:
    """Joins the rejects files of ``directory`` (by name) into ``destination`` line by line and
    counts them by reason."""
    reasons: collections.Counter = collections.Counter()
    with storage.local_output(destination) as local, open(local, "w", encoding="utf-8") as out:
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        reasons[_reason_kind(json.loads(line)["reason"])] += 1
                        out.write(line)
    return reasons


def merge(output: str, *, keep_parts: bool = False) -> int:
    """Join the parts written by `kangaroo data prepare --shard K/N` into one dataset.

    Args:
        output: the --output the parts were prepared into (local or s3://)
        keep_parts: keep OUTPUT/parts after merging
    """
    try:
        report = merge_parts(output, keep_parts=keep_parts)
    except NothingUsable as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def merge_parts(output: str, keep_parts: bool = False) -> PrepareReport:
    """Joins the N parts of ``output/parts`` (``prepare_dataset(..., shard=(K, N))`` on each
    machine) into one dataset in ``output``: LitData's ``merge_datasets`` copies the chunks (a
    server-side copy on ``s3://``) in shard order and writes one ``index.json``; the rejects
    files are joined into ``output/rejects.jsonl``. The parts are removed afterwards unless
    ``keep_parts``. Refuses a missing or unfinished part, parts of different N, and an
    ``output`` that already holds a dataset."""
    from litdata.processing.functions import merge_datasets

    parts_root = storage.join(output, PARTS_DIR)
    names = [os.path.basename(p.rstrip("/")) for p in storage.listdir(parts_root)]
    if not names:
        raise ValueError(f"no parts in {parts_root}; prepare them with --shard K/N first")
    counts = {int(name.split("-of-")[1]) for name in names if "-of-" in name}
    if len(counts) != 1:
        raise ValueError(f"{parts_root} holds parts of different shard counts: {sorted(names)}")
    count = counts.pop()
    infos = []
    for index in range(count):
        path = storage.join(part_dir(output, (index, count)), PART_FILE)
        if not storage.exists(path):
            raise ValueError(f"part {index} of {count} is missing or unfinished (no {path}); "
                             f"run `kangaroo data prepare --shard {index}/{count}` for it")
        infos.append(json.loads(storage.read_text(path)))
    if len({(info["usable"], info.get("fingerprint")) for info in infos}) != 1:
        raise ValueError(f"the parts in {parts_root} were prepared from different manifests or settings "
                         f"(usable lines {[info['usable'] for info in infos]}; their ordered ids, prepare "
                         "settings and visual layout must agree)")
    if storage.exists(storage.join(output, "index.json")):
        raise ValueError(f"{output} already holds a dataset; remove it or merge elsewhere")
    filled = [part_dir(output, (i, count)) for i, info in enumerate(infos) if info["prepared"]]
    if not filled:
        raise NothingUsable(f"no part in {parts_root} holds a usable sample")
    print(f"merging {len(filled)} parts into {output}", flush=True)
    if len(filled) == 1:  # merge_datasets takes two or more; one part's files are the dataset as they are
        _copy_dataset(filled[0], output)
    else:
        merge_datasets(filled, output, max_workers=min(8, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="kangaroo-rejects-") as scratch:
        for index in range(count):
            source = storage.join(part_dir(output, (index, count)), REJECTS_FILE)
            if storage.exists(source):
                with storage.open_file(source, "rb") as src, open(os.path.join(scratch, f"{index:06d}"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        reasons = collect_rejects(scratch, storage.join(output, REJECTS_FILE))
    if not keep_parts:
        storage.remove(parts_root)
    return PrepareReport(output, _count_samples(output), reasons)


def _copy_dataset(source: str, output: str) -> None:
    """Copies the chunks of ``source`` into ``output``, ``index.json`` last."""
    fs, source_path = storage.filesystem(source)
    _, output_path = storage.filesystem(output)
    fs.makedirs(output_path, exist_ok=True)
    index = json.loads(storage.read_text(storage.join(source, "index.json")))
    for name in [chunk["filename"] for chunk in index["chunks"]] + ["index.json"]:
        fs.copy(f"{source_path.rstrip('/')}/{name}", f"{output_path.rstrip('/')}/{name}")


def _count_samples(output: str) -> int:
    index = storage.join(output, "index.json")
    if not storage.exists(index):
        return 0
    return sum(chunk["chunk_size"] for chunk in json.loads(storage.read_text(index))["chunks"])
