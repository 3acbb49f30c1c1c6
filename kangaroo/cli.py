"""The ``kangaroo`` command."""

from __future__ import annotations

import argparse
import json
import sys

from kangaroo.modules.builder import KangarooConfig
from kangaroo.modules.sizes import MODEL_SIZES, named_config


def load_model_config(path: str) -> KangarooConfig:
    """Reads a YAML file whose ``model`` key describes a ``KangarooConfig``; unknown keys are
    errors that name the key."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=KangarooConfig, required=True)
    try:
        cfg = parser.parse_path(path)
    except Exception as err:  # jsonargparse raises its own error types; re-raise with the file
        raise ValueError(f"{path}: {err}") from err
    return parser.instantiate_classes(cfg).model


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
