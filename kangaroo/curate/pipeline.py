"""``kangaroo curate``: the filters of a curation config over every line of a manifest.

Outputs, beside ``OUT.jsonl`` (the kept lines, plus clips cut by ``SceneCut``):

- ``OUT.report.json``: per filter its settings, lines examined and removed, errors and seconds;
- ``OUT.reasons.jsonl``: per input line its status (``kept``, ``removed``, ``error``), the
  filter and reason that removed it, and every filter's score;
- ``OUT.progress.jsonl``: the journal a rerun continues from (one line per finished input
  line, appended as each finishes, headed by the manifest's hash and the settings);
- ``OUT.clips/``: the clips ``SceneCut`` wrote.

Sample filters run on each line in a pool of processes (``workers``); a video that fails to
decode is an ``error`` with its reason, never fatal. Dataset filters (``CategoryBalance``) then
run over everything kept, whatever their place in the config.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

from kangaroo import storage
from kangaroo.curate.filters import (CurateFilter, DatasetFilter, Item, LineError, SampleFilter, StopCuration,
                                     default_filters)
from kangaroo.data.manifest import read_record

MEDIA_KEYS = ("video", "image")


def output_paths(output: str) -> dict[str, str]:
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return {"manifest": output, "report": stem + ".report.json", "reasons": stem + ".reasons.jsonl",
            "progress": stem + ".progress.jsonl", "clips": stem + ".clips"}


def load_filters(path: str | None) -> list[CurateFilter]:
    """The filters a curation YAML lists (``filters:``, each a ``class_path`` and
    ``init_args``), checked and built; ``None``: the defaults."""
    if path is None:
        return default_filters()
    import yaml
    from jsonargparse import ArgumentParser

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ValueError(f"cannot read curation config {path}: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("filters"), list) or not raw["filters"]:
        raise ValueError(f"{path}: a curation config is a mapping with a non-empty `filters:` list")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--filters", type=list[CurateFilter])
    try:
        filters = parser.instantiate(parser.parse_object(raw)).filters
    except Exception as err:  # jsonargparse and the filters' own checks raise various types
        raise ValueError(f"{path}: {err}") from err
    names = [f.name for f in filters]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: each filter may appear once, got {names}")
    return filters


def describe(filters: list[CurateFilter]) -> list[dict[str, Any]]:
    return [{"name": f.name, "class": f"{type(f).__module__}.{type(f).__qualname__}", "settings": f.settings()}
            for f in filters]


@dataclass
class CurateReport:
    data: dict[str, Any]

    def summary(self) -> str:
        d = self.data
        lines = [f"curated {d['lines']} lines of {d['manifest']}: kept {d['kept_lines']} (as {d['kept']} items "
                 f"with clips), removed {d['removed']}, errors {d['errors']} ({d['seconds']:.1f} s this run)",
                 f"  {'filter':<20}{'examined':>10}{'removed':>10}{'errors':>8}{'seconds':>10}"]
        for f in d["filters"]:
            lines.append(f"  {f['name']:<20}{f['examined']:>10}{f['removed']:>10}{f['errors']:>8}{f['seconds']:>10.1f}")
        for reason, count in d["error_reasons"].items():
            lines.append(f"  error x{count}: {reason}")
        lines.append(f"  kept lines: {d['output']}  reasons: {d['reasons']}  report: {d['report']}")
        return "\n".join(lines)


def shard_lines(numbers: list[int], shard: tuple[int, int] | None) -> list[int]:
    """The ``K``-th of ``N`` contiguous slices of a manifest's line numbers: every machine reads
    the whole manifest (JSON only), so the slices need no coordination."""
    if shard is None:
        return numbers
    index, count = shard
    if count < 2 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: K must lie in 0..N-1 and N be at least 2")
    return numbers[len(numbers) * index // count: len(numbers) * (index + 1) // count]


def curate(manifest: str, output: str, filters: list[CurateFilter] | None = None, workers: int = 1,
           restart: bool = False, progress: bool = True, shard: tuple[int, int] | None = None) -> CurateReport:
    """Runs ``filters`` (default: ``default_filters()``) over ``manifest`` into ``output``.
    A rerun on the same output continues from its journal; other settings or another manifest
    are refused unless ``restart``. ``shard=(K, N)`` runs the sample filters over the K-th of N
    contiguous slices of the manifest; the dataset filters (``CategoryBalance``) need every
    kept line and run when ``merge_curate_parts`` joins the N parts."""
    filters = default_filters() if filters is None else filters
    if not output.endswith(".jsonl"):
        raise ValueError(f"--output must be a .jsonl file, got {output}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    paths = output_paths(os.path.abspath(output))
    if os.path.realpath(manifest) in {os.path.realpath(p) for p in paths.values()}:
        raise ValueError(f"--output {output} would overwrite the manifest {manifest}; choose another file")
    os.makedirs(os.path.dirname(paths["manifest"]), exist_ok=True)
    base = os.path.dirname(os.path.abspath(manifest))
    try:
        with open(manifest, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise ValueError(f"cannot read manifest {manifest}: {err}") from err
    header = {"kind": "header", "manifest_sha256": hashlib.sha256(raw).hexdigest(), "filters": describe(filters)}
    if shard is not None:
        header["shard"] = list(shard)
    texts = raw.decode("utf-8", errors="replace").splitlines()
    mine = set(shard_lines([n for n, text in enumerate(texts, start=1) if text.strip()], shard))
    entries = _open_journal(paths["progress"], header, restart)

    started = time.perf_counter()
    sample_filters = [f for f in filters if isinstance(f, SampleFilter)]
    todo = []
    # ids already taken by lines of an earlier run (lines refused while reading carry no id of their own)
    seen: dict[str, int] = {e["id"]: e["line"] for e in entries.values() if e.get("filter") != "manifest"}
    with open(paths["progress"], "a", encoding="utf-8") as journal:
        for number, text in enumerate(texts, start=1):
            if number not in mine or number in entries:
                continue
            record, problem = read_record(text)
            sample_id = f"line {number}" if problem else record["id"]
            if problem is None and sample_id in seen:
                problem = f"duplicate id: line {seen[sample_id]} has the same id"
            if problem is not None:
                _append(journal, entries, {"line": number, "id": sample_id, "status": "error", "filter": "manifest",
                                           "reason": problem})
                continue
            seen[record["id"]] = number
            todo.append((number, record))
        _run(todo, base, sample_filters, paths["clips"], workers, progress, journal, entries)
    dataset = [f for f in filters if isinstance(f, DatasetFilter)] if shard is None else []
    report = _finish(manifest, paths, describe(filters), dataset, entries, time.perf_counter() - started, workers)
    if shard is not None:
        report.data.update(shard=list(shard), deferred=[f.name for f in filters if isinstance(f, DatasetFilter)])
        storage.write_text(paths["report"], json.dumps(report.data, ensure_ascii=False, indent=2) + "\n")
    return report


def _open_journal(path: str, header: dict, restart: bool) -> dict[int, dict]:
    """Finished lines from an earlier run (by line number); a torn last line is cut off."""
    if restart or not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(header, ensure_ascii=False) + "\n")
        return {}
    entries, good = {}, 0
    with open(path, "rb") as handle:
        for index, line in enumerate(handle):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                break  # the process was killed while writing this line
            if index == 0 and value != json.loads(json.dumps(header)):
                raise ValueError(f"{path} was written for another manifest or other filter settings; pass "
                                 "--restart to start over (or choose another --output)")
            if index > 0:
                entries[value["line"]] = value
            good += len(line)
    with open(path, "r+b") as handle:
        handle.truncate(good)
    return entries


def _append(journal, entries: dict[int, dict], entry: dict) -> None:
    journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
    journal.flush()
    entries[entry["line"]] = entry


_WORKER: dict[str, Any] = {}


def _init_worker(filters: list[SampleFilter], workspace: str, base: str, threads: int | None) -> None:
    if threads is not None:
        import cv2

        cv2.setNumThreads(threads)
        for f in filters:
            f.limit_threads(threads)
    _WORKER.update(filters=filters, base=base)  # before setup: a filter may read the manifest's folder
    for f in filters:
        f.setup(workspace)


def _run(todo, base, filters, workspace, workers, progress, journal, entries) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="curate", unit="line", disable=not progress or not todo, dynamic_ncols=True)
    kept = removed = errors = 0

    def record(entry: dict) -> None:
        nonlocal kept, removed, errors
        _append(journal, entries, entry)
        kept += entry["status"] == "kept"
        removed += entry["status"] == "removed"
        errors += entry["status"] == "error"
        bar.set_postfix(kept=kept, removed=removed, errors=errors, refresh=False)
        bar.update()

    if workers == 1:
        _init_worker(filters, workspace, base, None)
        for number, line in todo:
            record(curate_line(number, line))
    else:
        # spawn: a fresh interpreter per worker; forking after ONNX Runtime or OpenCV started
        # their thread pools can deadlock the child
        pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(filters, workspace, base, 1))
        with pool:
            pending, queue = set(), iter(todo)
            try:
                for number, line in queue:  # at most 4 lines per worker in flight
                    pending.add(pool.submit(curate_line, number, line))
                    if len(pending) >= 4 * workers:
                        done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                        for future in done:
                            record(future.result())
                for future in futures.as_completed(pending):
                    record(future.result())
            except StopCuration:
                # lines not started stay unasked (a rerun does them); those running finish or fail fast
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()


def curate_line(number: int, line: dict) -> dict:
    """Runs the worker's sample filters over one manifest line; the journal entry."""
    filters: list[SampleFilter] = _WORKER["filters"]
    entry: dict[str, Any] = {"line": number, "id": line["id"], "scores": {}, "stats": {}, "removed": []}
    media = [k for k in MEDIA_KEYS if line.get(k)]
    video = None
    if "video" in media:
        value = line["video"]
        if not isinstance(value, str):
            return {**entry, "status": "error", "filter": "media", "reason": f"media path must be a string, got {value!r}"}
        if "://" in value:
            return {**entry, "status": "error", "filter": "media",
                    "reason": f"object-store media ({value}) is not read by curate; curate a local copy"}
        video = os.path.normpath(os.path.join(_WORKER["base"], value))
    items = [Item(line["id"], line, video, number)]
    for f in filters:
        survivors = []
        for item in items:
            if not f.applies(item):
                survivors.append(item)
                continue
            stats = entry["stats"].setdefault(f.name, {"examined": 0, "removed": 0, "errors": 0, "seconds": 0.0})
            started = time.perf_counter()
            try:
                verdict = f.check(item)
            except StopCuration:
                raise
            except Exception as err:  # a bad file must not stop a run over thousands; the reason says what broke
                stats["errors"] += 1
                stats["seconds"] += time.perf_counter() - started
                plain = isinstance(err, LineError) or type(err).__name__ == "MediaError"
                reason = str(err) if plain else f"{type(err).__name__}: {err}"
                return {**entry, "status": "error", "filter": f.name, "reason": reason}
            stats["seconds"] += time.perf_counter() - started
            stats["examined"] += 1
            for key, value in verdict.counts.items():
                stats[key] = stats.get(key, 0) + value
            if verdict.score is not None:
                entry["scores"].setdefault(f.name, []).append(round(float(verdict.score), 4))
            if verdict.keep:
                survivors += verdict.items or [item]
            else:
                stats["removed"] += 1
                entry["removed"].append({"id": item.id, "filter": f.name, "reason": verdict.reason})
        items = survivors
    entry["scores"] = {k: v[0] if len(v) == 1 else v for k, v in entry["scores"].items()}
    entry["records"] = [_with_local_media(item) for item in items]
    if items:
        return {**entry, "status": "kept"}
    first = entry["removed"][0]
    return {**entry, "status": "removed", "filter": first["filter"], "reason": first["reason"]}


def _with_local_media(item: Item) -> dict:
    """The record to write, its local media as absolute paths (made relative to the output on
    writing when the input was relative, and for clips)."""
    record = dict(item.record)
    relative = []
    for key in MEDIA_KEYS:
        value = record.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            record[key] = os.path.normpath(os.path.join(_WORKER["base"], value))
            relative.append(key)
    record["_relative"] = relative
    return record


def _finish(manifest, paths, described: list[dict], dataset: list[DatasetFilter], entries, seconds,
            workers) -> CurateReport:
    """Runs the ``dataset`` filters over every kept item of ``entries`` (the journal) and writes
    the kept lines, the reasons and the report."""
    ordered = [entries[n] for n in sorted(entries)]
    items = [Item(r["id"], r, r.get("video"), e["line"]) for e in ordered if e["status"] == "kept" for r in e["records"]]
    stats = collections.defaultdict(lambda: {"examined": 0, "removed": 0, "errors": 0, "seconds": 0.0})
    for entry in ordered:
        for name, values in entry.get("stats", {}).items():
            for key, value in values.items():
                stats[name][key] = stats[name].get(key, 0) + value
    by_line = {e["line"]: e for e in ordered}
    details = {}
    for f in dataset:
        started = time.perf_counter()
        kept, removed, details[f.name] = f.select(items)
        stats[f.name].update(examined=len(items), removed=len(removed), seconds=time.perf_counter() - started)
        for item, reason in removed:
            by_line[item.line].setdefault("removed", []).append({"id": item.id, "filter": f.name, "reason": reason})
        items = kept
    survivors = collections.Counter(item.line for item in items)
    out_dir = os.path.dirname(paths["manifest"])
    _write_lines(paths["manifest"], [_output_record(item.record, out_dir) for item in items])
    reasons = []
    for entry in ordered:
        status = entry["status"]
        if status == "kept" and not survivors[entry["line"]]:
            status = "removed"
            last = entry["removed"][-1]
            entry = {**entry, "filter": last["filter"], "reason": last["reason"]}
        reasons.append({k: v for k, v in {**entry, "status": status}.items() if k not in ("records", "stats")})
    _write_lines(paths["reasons"], reasons)
    statuses = collections.Counter(r["status"] for r in reasons)
    data = {
        "manifest": os.path.abspath(manifest), "output": paths["manifest"], "reasons": paths["reasons"],
        "report": paths["report"], "lines": len(reasons), "kept": len(items), "kept_lines": statuses["kept"],
        "removed": statuses["removed"], "errors": statuses["error"], "workers": workers,
        "seconds": round(seconds, 2),
        "filters": [{"name": d["name"], "class": d["class"], "settings": d["settings"],
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats[d["name"]].items()},
                     **({"details": details[d["name"]]} if d["name"] in details else {})} for d in described],
        "error_reasons": dict(collections.Counter(r["reason"].split(":")[0] for r in reasons
                                                  if r["status"] == "error").most_common()),
    }
    storage.write_text(paths["report"], json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    return CurateReport(data)


def _output_record(record: dict, out_dir: str) -> dict:
    record = dict(record)
    for key in record.pop("_relative", []):
        record[key] = os.path.relpath(record[key], out_dir)
    clip = record.get("video")
    if isinstance(clip, str) and clip.startswith(out_dir + os.sep):
        record["video"] = os.path.relpath(clip, out_dir)
    return record


def _write_lines(path: str, values: list) -> None:
    storage.write_text(path, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values))


def check_shards(found: list[tuple]) -> list[tuple]:
    """``found``: per part ``(shard, journal header, ...)``. Sorted by shard, once each checked to
    be every shard ``K/N`` of one ``N``, run over one manifest with one set of settings."""
    found = sorted(found, key=lambda f: f[0])
    count = found[0][0][1]
    if [f[0] for f in found] != [(k, count) for k in range(count)]:
        raise ValueError(f"the parts are shards {[f'{k}/{n}' for (k, n), *_ in found]}; a merge needs every "
                         f"shard K/{count}, K = 0..{count - 1}, once")
    if any({**f[1], "shard": None} != {**found[0][1], "shard": None} for f in found):
        raise ValueError("the parts were run over different manifests or with different settings")
    return found


def merge_curate_parts(parts: list[str], output: str) -> CurateReport:
    """Joins the outputs of ``kangaroo curate --shard K/N`` (every K of one N, each finished, the
    same manifest and filters): the parts' journals are read as one run's, then the dataset
    filters run over every kept line and the output is written as one pass writes it."""
    found = []
    for part in parts:
        part_paths = output_paths(os.path.abspath(part))
        try:
            with open(part_paths["report"], encoding="utf-8") as handle:
                report = json.load(handle)
            lines = open(part_paths["progress"], encoding="utf-8").read().splitlines()
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{part} is not the output of a finished `kangaroo curate --shard` run: {err}") from None
        header = json.loads(lines[0])
        if not header.get("shard"):
            raise ValueError(f"{part} was not run with --shard")
        entries = {e["line"]: e for e in map(json.loads, lines[1:])}
        if len(entries) != report.get("lines"):
            raise ValueError(f"{part} did not finish; run its command again first")
        found.append((tuple(header["shard"]), header, entries, report))
    found = check_shards(found)
    described = found[0][1]["filters"]
    dataset = [_rebuild(d) for d in described if d["name"] in found[0][3].get("deferred", [])]
    entries = {n: e for f in found for n, e in f[2].items()}
    seen: dict[str, int] = {}  # as one pass refuses a repeated id, across the parts too
    for number in sorted(entries):
        entry = entries[number]
        if entry.get("filter") == "manifest" and entry["id"] == f"line {number}":
            continue  # refused before it had an id
        if entry["id"] in seen and not entry.get("reason", "").startswith("duplicate id"):
            entries[number] = {"line": number, "id": entry["id"], "status": "error", "filter": "manifest",
                               "reason": f"duplicate id: line {seen[entry['id']]} has the same id"}
        seen.setdefault(entry["id"], number)
    paths = output_paths(os.path.abspath(output))
    if any(paths["manifest"] == output_paths(os.path.abspath(p))["manifest"] for p in parts):
        raise ValueError(f"--output {output} is one of the parts")
    os.makedirs(os.path.dirname(paths["manifest"]), exist_ok=True)
    report = _finish(found[0][3]["manifest"], paths, described, dataset, entries,
                     max(f[3]["seconds"] for f in found), sum(f[3]["workers"] for f in found))
    report.data["parts"] = [os.path.abspath(p) for p in parts]
    storage.write_text(paths["report"], json.dumps(report.data, ensure_ascii=False, indent=2) + "\n")
    return report


def _rebuild(described: dict) -> DatasetFilter:
    """A dataset filter from its journal description (its class and constructor arguments)."""
    import importlib

    module, _, name = described["class"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**described["settings"])
