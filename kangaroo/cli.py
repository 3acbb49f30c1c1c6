"""The ``kangaroo`` command."""

from __future__ import annotations

import argparse
import json
import sys

from kangaroo.modules.builder import KangarooConfig
from kangaroo.modules.sizes import MODEL_SIZES, named_config


def load_config_sections(path: str, sections: dict[str, type]) -> dict:
    """Reads the YAML file at ``path`` into the given typed sections (``{"model": KangarooConfig}``);
    a missing section or an unknown key is an error that names it and the file."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    for name, kind in sections.items():
        parser.add_argument(f"--{name}", type=kind, required=True)
    try:
        cfg = parser.parse_path(path)
    except Exception as err:  # jsonargparse raises its own error types; re-raise with the file
        raise ValueError(f"{path}: {err}") from err
    instantiated = parser.instantiate(cfg)
    return {name: instantiated[name] for name in sections}


def load_model_config(path: str) -> KangarooConfig:
    """Reads a YAML file whose ``model`` key describes a ``KangarooConfig``."""
    return load_config_sections(path, {"model": KangarooConfig})["model"]


def _summary_command(args: argparse.Namespace) -> int:
    from kangaroo.summary import format_summary, summarize_config

    if args.config:
        config = load_model_config(args.config)
    else:
        overrides = {}
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        if args.no_patchify:
            overrides["patchify"] = False
        config = named_config(args.model, **overrides)
    summary = summarize_config(config)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _prepare_command(args: argparse.Namespace) -> int:
    from kangaroo.data.encode import PrepareConfig
    from kangaroo.data.prepare import NothingUsable, prepare_dataset

    sections = load_config_sections(args.config, {"model": KangarooConfig, "prepare": PrepareConfig})
    try:
        report = prepare_dataset(args.manifest, args.output, sections["prepare"], sections["model"],
                                 workers=args.workers, strict=args.strict, overwrite=args.overwrite,
                                 allowed_roots=args.allowed_root)
    except NothingUsable as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo", description="Training recipes for Kangaroo video LMMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="inspect model architectures").add_subparsers(
        dest="model_command", required=True
    )
    summary = model.add_parser("summary", help="parameters per part and visual tokens per frame (no weights loaded)")
    source = summary.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML file with a `model:` section (a KangarooConfig)")
    source.add_argument("--model", default="kangaroo-8b", choices=sorted(MODEL_SIZES), help="a named size")
    summary.add_argument("--image-size", type=int, help="resolution for a named size (default: its stage 3-5 size)")
    summary.add_argument("--no-patchify", action="store_true", help="a named size without patchify (stages 1-2)")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=_summary_command)

    data = commands.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="decode, sample, resize and tokenize a manifest into LitData chunks")
    prepare.add_argument("--manifest", required=True, help="JSONL manifest (see docs/data.md)")
    prepare.add_argument("--output", required=True, help="output folder for the chunks and rejects.jsonl")
    prepare.add_argument("--config", required=True, help="YAML with `model:` and `prepare:` sections")
    prepare.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    prepare.add_argument("--strict", action="store_true", help="fail on any rejected sample")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prepare.add_argument("--allowed-root", action="append", help="a folder media must live under "
                         "(repeatable; default: the manifest's folder)")
    prepare.set_defaults(handler=_prepare_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
