"""Entries of ``kangaroo curate``: the filters, captioning, and the merge of sharded parts.

Typed functions that ``kangaroo.cli`` registers through jsonargparse (flags, ``--help``,
``--config`` and ``--print_config`` from the signature and docstring); each returns the exit code.
"""

from __future__ import annotations

import json
import os
import sys

from kangaroo.data.manifest import parse_shard


def filter_manifest(*, manifest: str, output: str, filters: str | None = None, workers: int = 1,
                    restart: bool = False, shard: str | None = None) -> int:
    """Filter the videos of a manifest (text, faces, static scenes, scene cuts, category balance,
    repetitive captions).

    Runs the curation filters over every line of a manifest and writes the kept lines to --output,
    with OUT.report.json (per filter: settings, examined, removed, errors, seconds) and
    OUT.reasons.jsonl (per line: status, reason, scores). Rerunning on the same output continues
    where it stopped.

    Args:
        manifest: JSONL manifest (see docs/curation.md)
        output: the kept lines, a .jsonl file
        filters: curation YAML: the filters, their order and thresholds (default: the built-in defaults,
            spelled out in configs/curate.yaml)
        workers: processes
        restart: discard the progress of an earlier run on this output
        shard: K/N: run the sample filters over the K-th of N contiguous slices of the manifest;
            `kangaroo curate merge` joins the parts and runs the dataset filters
    """
    from kangaroo.curate.captions import BackendUnavailable
    from kangaroo.curate.pipeline import curate, load_filters

    part = parse_shard(shard)
    try:
        report = curate(manifest, output, load_filters(filters), workers=workers, restart=restart, shard=part)
    except BackendUnavailable as err:  # the Captioning step's server is gone; finished lines are journaled
        print(f"kangaroo: error: {err}. Every finished line is kept: run the same command again to continue",
              file=sys.stderr)
        return 1
    print(report.summary())
    if report.data["kept"] == 0 and part is None:  # a shard may keep nothing; the merge judges the whole
        print(f"kangaroo: error: no line of {manifest} was kept; reasons in {report.data['reasons']}",
              file=sys.stderr)
        return 1
    return 0


def caption(*, manifest: str, output: str, captions: str, language: str | None = None,
            concurrency: int | None = None, shard: str | None = None, restart: bool = False) -> int:
    """Caption videos (frame captions summarised) and re-caption images against model servers.

    Draws frames from each video (one per segment), asks a multimodal model to caption each, and an
    LLM to summarise them into one video caption; re-captions image lines. Backends are
    OpenAI-compatible servers (vLLM, SGLang, kangaroo serve, transformers serve) or local
    transformers models, named in --captions. Writes OUT.jsonl, OUT.report.json, OUT.reasons.jsonl;
    a rerun on the same output continues where it stopped. See docs/curation.md.

    Args:
        manifest: JSONL manifest
        output: the captioned lines, a .jsonl file
        captions: captioning YAML (backends, frames, prompts; e.g. configs/captions.yaml)
        language: prompt language for lines without meta.language (default: the captioning YAML's)
        concurrency: lines in flight at once (default: the captioning YAML's)
        shard: K/N: caption only the K-th of N contiguous slices of the manifest (join the parts with
            `kangaroo curate merge`)
        restart: discard the progress of an earlier run on this output
    """
    from kangaroo.curate.captions import CaptioningStopped, caption_manifest, check_config, load_caption_config

    config = load_caption_config(captions)
    if concurrency is not None:
        config.concurrency = concurrency
        check_config(config, "--concurrency")
    part = parse_shard(shard)
    try:
        report = caption_manifest(manifest, output, config, language=language, shard=part, restart=restart)
    except CaptioningStopped as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.data["captioned"] == 0 and report.data["lines"] and part is None:  # a shard may hold nothing
        print(f"kangaroo: error: no line of {manifest} was captioned; reasons in "
              f"{report.data['output'][:-len('.jsonl')]}.reasons.jsonl", file=sys.stderr)
        return 1
    return 0


def merge(parts: list[str], *, output: str) -> int:
    """Join the parts of `kangaroo curate --shard K/N` or `curate caption --shard K/N` run on several machines.

    Checks that the parts are every shard of one manifest run with the same settings, each
    finished, and writes their lines in manifest order to --output with one summed report.

    Args:
        parts: the parts' output .jsonl files
        output: the joined lines, a .jsonl file
    """
    from kangaroo.curate.captions import merge_caption_parts
    from kangaroo.curate.pipeline import merge_curate_parts, output_paths

    try:  # a part of `curate caption` or of `curate`: its journal's header says which
        with open(output_paths(os.path.abspath(parts[0]))["progress"], encoding="utf-8") as handle:
            header = json.loads(handle.readline())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{parts[0]} has no journal of a sharded run: {err}") from None
    joined = merge_caption_parts if "captioning" in header else merge_curate_parts
    print(joined(parts, output).summary())
    return 0
