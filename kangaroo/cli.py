"""The ``kangaroo`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kangaroo import storage
from kangaroo.modules.sizes import MODEL_SIZES, named_config

FIT_COMMANDS = ("fit", "validate")


def _summary_command(args: argparse.Namespace) -> int:
    from kangaroo.modules.summary import format_summary, model_summary, summarize_config

    if args.config:
        import torch

        from kangaroo.training.stage_file import load_stage_file

        stage = load_stage_file(args.config, ("model",))["model"]
        with torch.device("meta"):
            stage.configure_model()
        summary = model_summary(stage.model)
    else:
        overrides = {}
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        if args.no_patchify:
            overrides["patchify"] = False
        summary = summarize_config(named_config(args.model, **overrides))
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _prepare_command(args: argparse.Namespace) -> int:
    from kangaroo.data.prepare import NothingUsable, prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    sections = load_stage_file(args.config)
    stage, data = sections["model"], sections["data"]
    if data.prepare is None:
        raise ValueError(f"{args.config}: no `data.prepare:` section saying how to prepare this stage's data")
    output = args.output or (data.hparams.train_dir if args.split == "train" else data.hparams.val_dir)
    if output is None:
        raise ValueError(f"{args.config}: no data.{args.split}_dir and no --output")
    shard = _parse_shard(args.shard) if args.shard else None
    if shard is not None and shard[1] < 2:
        raise ValueError(f"--shard {args.shard}: N must be at least 2 (without --shard, one pass writes the dataset)")
    try:
        report = prepare_dataset(args.manifest, output, data.prepare, visual_layout(stage.architecture),
                                 workers=args.workers, strict=args.strict, overwrite=args.overwrite,
                                 allowed_roots=args.allowed_root, shard=shard)
    except NothingUsable as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _merge_command(args: argparse.Namespace) -> int:
    from kangaroo.data.prepare import NothingUsable, merge_parts

    try:
        report = merge_parts(args.output, keep_parts=args.keep_parts)
    except NothingUsable as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _stats_command(args: argparse.Namespace) -> int:
    from kangaroo.data.stats import cached_record_tokens, epoch_plan
    from kangaroo.training.stage_file import load_stage_file, read_stage_yaml

    trainer = read_stage_yaml(args.config).get("trainer") or {}
    hp = load_stage_file(args.config, ("data",))["data"].hparams
    nodes = int(trainer.get("num_nodes", 1))
    devices = args.devices or int(trainer.get("devices", 1)) * nodes
    if args.accumulate:
        accumulate = args.accumulate
    elif hp.global_batch:  # as the fit derives it (KangarooDataModule.apply_schedule)
        if hp.global_batch % (devices * hp.rows_per_batch):
            raise ValueError(f"data.global_batch ({hp.global_batch} rows) is not a multiple of {devices} processes x "
                             f"data.rows_per_batch {hp.rows_per_batch}")
        accumulate = hp.global_batch // (devices * hp.rows_per_batch)
    else:
        accumulate = int(trainer.get("accumulate_grad_batches", 1))
    tokens = cached_record_tokens(args.directory)
    for epoch in range(1, args.epochs + 1):
        plan = epoch_plan(args.directory, hp.max_tokens, packing=hp.packing, rows_per_batch=hp.rows_per_batch,
                          buffer_size=hp.buffer_size, shuffle=hp.shuffle, seed=hp.seed, num_workers=hp.num_workers,
                          processes=devices, nodes=nodes if devices % nodes == 0 else 1, accumulate=accumulate,
                          epoch=epoch, tokens=tokens)
        print(f"epoch {epoch} of {args.directory} at {args.config}'s budget, on {devices} processes "
              f"with {max(hp.num_workers, 1)} loader worker(s) each:\n{plan.summary()}")
    return 0


def _synth_command(args: argparse.Namespace) -> int:
    from kangaroo.world import WorldConfig, synthesize

    info = synthesize(args.output, WorldConfig(seed=args.seed), overwrite=args.overwrite)
    for name, count in info["manifests"].items():
        print(f"{name:<40}{count:>7}")
    return 0


def _curate_command(args: argparse.Namespace) -> int:
    from kangaroo.curate.pipeline import curate, load_filters

    missing = [flag for flag in ("manifest", "output") if not getattr(args, flag)]
    if missing:
        raise ValueError(f"kangaroo curate needs {' and '.join('--' + m for m in missing)} "
                         "(or a subcommand: caption)")
    from kangaroo.curate.captions import BackendUnavailable

    shard = _parse_shard(args.shard) if args.shard else None
    try:
        report = curate(args.manifest, args.output, load_filters(args.config), workers=args.workers,
                        restart=args.restart, shard=shard)
    except BackendUnavailable as err:  # the Captioning step's server is gone; finished lines are journaled
        print(f"kangaroo: error: {err}. Every finished line is kept: run the same command again to continue",
              file=sys.stderr)
        return 1
    print(report.summary())
    if report.data["kept"] == 0 and shard is None:  # a shard may keep nothing; the merge judges the whole
        print(f"kangaroo: error: no line of {args.manifest} was kept; reasons in {report.data['reasons']}",
              file=sys.stderr)
        return 1
    return 0


def _caption_command(args: argparse.Namespace) -> int:
    from kangaroo.curate.captions import CaptioningStopped, caption_manifest, load_caption_config

    from kangaroo.curate.captions import check_config

    config = load_caption_config(args.config)
    if args.concurrency is not None:
        config.concurrency = args.concurrency
        check_config(config, "--concurrency")
    shard = _parse_shard(args.shard) if args.shard else None
    try:
        report = caption_manifest(args.manifest, args.output, config, language=args.language, shard=shard,
                                  restart=args.restart)
    except CaptioningStopped as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.data["captioned"] == 0 and report.data["lines"] and shard is None:  # a shard may hold nothing to keep
        print(f"kangaroo: error: no line of {args.manifest} was captioned; reasons in "
              f"{report.data['output'][:-len('.jsonl')]}.reasons.jsonl", file=sys.stderr)
        return 1
    return 0


def _curate_merge_command(args: argparse.Namespace) -> int:
    from kangaroo.curate.captions import merge_caption_parts
    from kangaroo.curate.pipeline import merge_curate_parts, output_paths

    try:  # a part of `curate caption` or of `curate`: its journal's header says which
        with open(output_paths(os.path.abspath(args.parts[0]))["progress"], encoding="utf-8") as handle:
            header = json.loads(handle.readline())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{args.parts[0]} has no journal of a sharded run: {err}") from None
    merge = merge_caption_parts if "captioning" in header else merge_curate_parts
    print(merge(args.parts, args.output).summary())
    return 0


def _consolidate_command(args: argparse.Namespace) -> int:
    from kangaroo.training.weights import consolidate_checkpoint

    output = args.output or os.path.splitext(args.checkpoint.rstrip("/"))[0] + ".safetensors"
    print(f"weights of {args.checkpoint} written to {consolidate_checkpoint(args.checkpoint, output)}")
    return 0


def _recipe_workdir(recipe, args: argparse.Namespace) -> str:
    return args.workdir or recipe.workdir or os.path.join("runs", recipe.name)


def _recipe_run_command(args: argparse.Namespace) -> int:
    from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE
    from kangaroo.recipe import NodeSetup, Preempted, load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.rehearse:
        from kangaroo.recipe.rehearsal import rehearsal

        args.workdir = args.workdir or os.path.join("runs", f"{recipe.name}-rehearsal")
        recipe, notes = rehearsal(recipe, devices=args.devices or 2, world=os.path.join(args.workdir, "world"))
        print(f"rehearsal of {args.recipe} on {args.devices or 2} CPU processes, in {args.workdir}; what it changes "
              "in the stage files:")
        print("\n".join(f"  {note}" for note in notes), flush=True)
    elif args.devices:
        print("kangaroo: error: --devices goes with --rehearse (a recipe's own stages name their devices)",
              file=sys.stderr)
        return 2
    try:
        nodes = NodeSetup.from_environment(args.num_nodes, args.node_rank, args.coordinator_port, args.node_timeout)
    except ValueError as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_recipe(recipe, _recipe_workdir(recipe, args), only=args.only, until=args.until,
                             restart_from=args.restart_from, prepare_workers=args.prepare_workers, nodes=nodes)
    except Preempted as err:
        print(f"kangaroo: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as err:
        outage = storage.unreachable_store(err)
        if outage is None and not isinstance(err, RuntimeError):
            raise
        print(f"kangaroo: error: {outage or err}", file=sys.stderr)
        return 1
    return 0 if summary else 1


def _recipe_show_command(args: argparse.Namespace) -> int:
    from kangaroo.recipe import load_recipe, show_recipe

    recipe = load_recipe(args.recipe)
    print(show_recipe(recipe, storage.absolute(_recipe_workdir(recipe, args))))
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from kangaroo.inference.folder import export_model

    print(f"model folder written to {export_model(args.source, args.output, args.config, args.overwrite)}")
    return 0


def _load_generator(args: argparse.Namespace):
    from kangaroo.inference import Generator, load_pretrained

    loaded = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    print(loaded.describe(), file=sys.stderr, flush=True)
    return Generator(loaded, cache_mb=getattr(args, "cache_mb", 1024.0))


def _chat_command(args: argparse.Namespace) -> int:
    from kangaroo.inference.chat import run_chat

    generator = _load_generator(args)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k}
    return run_chat(generator, args.video or args.image, args.query, args.history, **options)


def _serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    if args.batch_wait_ms < 0:
        raise ValueError(f"--batch-wait-ms must be 0 or more, got {args.batch_wait_ms:g}")

    from kangaroo.inference.server import ServeConfig, create_app

    generator = _load_generator(args)
    name = args.served_model_name or os.path.basename(os.path.abspath(args.model).rstrip("/"))
    config = ServeConfig(name, [os.path.abspath(root) for root in args.allowed_media_root or []],
                         args.allow_remote_media, int(args.max_media_mb * 2**20), args.max_frames, args.max_tokens,
                         args.request_timeout, args.max_batch, args.max_batch_tokens, args.allow_media_host,
                         args.batch_wait_ms / 1000)
    print(f"serving {args.model} as {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(create_app(generator, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from kangaroo.inference.demo import launch

    if not os.path.isdir(args.model):
        raise ValueError(f"no model folder at {args.model}")
    return launch(os.path.abspath(args.model), args.host, args.port, args.max_upload_mb, args.examples,
                  args.temperature, args.device, args.dtype)


def _eval_command(args: argparse.Namespace) -> int:
    from kangaroo.evaluation import evaluate_shard, format_results, read_benchmark, summarize
    from kangaroo.evaluation.run import frame_sampling, launch_shards

    questions = read_benchmark(args.benchmark, args.data)
    videos = args.videos or os.path.dirname(os.path.abspath(args.data))
    if args.devices > 1 and args.shard is None:
        argv = _without_option(_without_option(args.argv, "--devices"), "--device")
        device = args.device
        if device.startswith("cuda"):  # each shard sees its one GPU as cuda:0
            argv += ["--device", "cuda"]
        elif device != "cpu":
            argv += ["--device", device]
        launch_shards(argv, args.devices, device)
        shards = args.devices
    else:
        index, count = _parse_shard(args.shard)
        generator = _load_generator(args)
        generator.sampling = frame_sampling(generator.sampling, args.frames, args.fps)
        evaluate_shard(generator, questions, videos, args.output, args.mode, (index, count), progress=not args.quiet,
                       benchmark=args.benchmark)
        if args.no_summary:
            return 0
        shards = count
    print(format_results(summarize(questions, args.output, shards, args.benchmark, args.mode)))
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(name + "="):
            kept.append(word)
    return kept


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: K must lie in 0..N-1")
    return index, count


CACHE_HELP = ("memory for the decoded frames and prompt KV caches of recent conversations, so that a next question "
              "about a video prefills only what is new (default 1024 MB; 0: off)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model folder (kangaroo export, or a recipe's last stage)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", help="cast the weights, e.g. bfloat16 on a GPU (default: as stored)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kangaroo", description="Training recipes for Kangaroo video LMMs.",
        epilog="Stages: `kangaroo fit --config configs/kangaroo-tiny/1-image-pretrain.yaml` (LightningCLI; "
               "`kangaroo fit --help` lists every option). `kangaroo validate` evaluates the same way.")
    commands = parser.add_subparsers(dest="command", required=True)
    # `main` hands these two to LightningCLI before this parser runs; they are listed here so that
    # `kangaroo --help` names every command
    commands.add_parser("fit", help="train one curriculum stage from its YAML (LightningCLI: "
                        "`kangaroo fit --help` lists every option)", add_help=False)
    commands.add_parser("validate", help="evaluate a stage on its validation data (LightningCLI)", add_help=False)

    model = commands.add_parser("model", help="inspect model architectures").add_subparsers(
        dest="model_command", required=True
    )
    summary = model.add_parser("summary", help="parameters per part and visual tokens per frame (no weights loaded)")
    source = summary.add_mutually_exclusive_group()
    source.add_argument("--config", help="a stage file (configs/*/N-*.yaml): its model and trainable parts")
    source.add_argument("--model", default="kangaroo-8b", choices=sorted(MODEL_SIZES), help="a named size")
    summary.add_argument("--image-size", type=int, help="resolution for a named size (default: its stage 3-5 size)")
    summary.add_argument("--no-patchify", action="store_true", help="a named size without patchify (stages 1-2)")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=_summary_command)

    data = commands.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="decode, sample, resize and tokenize a manifest into LitData chunks")
    prepare.add_argument("--manifest", required=True, help="JSONL manifest (see docs/data.md)")
    prepare.add_argument("--config", required=True, help="the stage file whose data this is (its data.prepare section)")
    prepare.add_argument("--split", choices=("train", "val"), default="train",
                         help="write to the stage's data.train_dir or data.val_dir (default train)")
    prepare.add_argument("--output", help="output folder for the chunks and rejects.jsonl (default: from --split)")
    prepare.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    prepare.add_argument("--strict", action="store_true", help="fail on any rejected sample")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prepare.add_argument("--allowed-root", action="append", help="a folder media must live under "
                         "(repeatable; default: the manifest's folder)")
    prepare.add_argument("--shard", metavar="K/N", help="prepare only slice K of N into OUTPUT/parts/K-of-N "
                         "(one machine each; then `kangaroo data merge OUTPUT`)")
    prepare.set_defaults(handler=_prepare_command)
    merge = data.add_parser("merge", help="join the parts written by `prepare --shard K/N` into one dataset")
    merge.add_argument("output", help="the --output the parts were prepared into (local or s3://)")
    merge.add_argument("--keep-parts", action="store_true", help="keep OUTPUT/parts after merging")
    merge.set_defaults(handler=_merge_command)
    stats = data.add_parser("stats", help="records, tokens, packed rows and optimizer steps of an epoch of prepared "
                            "data at a stage's budget, on N processes")
    stats.add_argument("directory", help="prepared data (local or s3://)")
    stats.add_argument("--config", required=True, help="the stage file (its data section and trainer's accumulation)")
    stats.add_argument("--devices", type=int, help="processes of the run (default: the stage's devices x num_nodes)")
    stats.add_argument("--accumulate", type=int, help="micro-batches per optimizer step (default: from the stage's "
                       "data.global_batch, else its trainer.accumulate_grad_batches)")
    stats.add_argument("--epochs", type=int, default=1, help="epochs to show (their order, so their rows, differ)")
    stats.set_defaults(handler=_stats_command)
    synth = data.add_parser("synth", help="write the tiny synthetic world: videos, manifests for all five stages, "
                                          "held-out questions, tokenizer and text-trained tiny LLM")
    synth.add_argument("--output", default="data/kangaroo-tiny", help="folder (default data/kangaroo-tiny)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace a world made with other settings")
    synth.set_defaults(handler=_synth_command)

    curate = commands.add_parser(
        "curate", help="filter the videos of a manifest (text, faces, static scenes, scene cuts, category balance, "
                       "repetitive captions)",
        description="Runs the curation filters over every line of a manifest and writes the kept lines to --output, "
                    "with OUT.report.json (per filter: settings, examined, removed, errors, seconds) and "
                    "OUT.reasons.jsonl (per line: status, reason, scores). Rerunning on the same output continues "
                    "where it stopped.")
    curate.add_argument("--manifest", help="JSONL manifest (see docs/curation.md)")
    curate.add_argument("--output", help="the kept lines, a .jsonl file")
    curate.add_argument("--config", help="curation YAML: the filters, their order and thresholds "
                        "(default: the built-in defaults, spelled out in configs/curate.yaml)")
    curate.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    curate.add_argument("--restart", action="store_true", help="discard the progress of an earlier run on this output")
    curate.add_argument("--shard", help="K/N: run the sample filters over the K-th of N contiguous slices of the "
                        "manifest; `kangaroo curate merge` joins the parts and runs the dataset filters")
    curate.set_defaults(handler=_curate_command)
    curate_commands = curate.add_subparsers(dest="curate_command", metavar="{caption,merge}")
    caption = curate_commands.add_parser(
        "caption", help="caption videos (frame captions summarised) and re-caption images against model servers",
        description="Draws frames from each video (one per segment), asks a multimodal model to caption each, and "
                    "an LLM to summarise them into one video caption; re-captions image lines. Backends are "
                    "OpenAI-compatible servers (vLLM, SGLang, kangaroo serve, transformers serve) or local "
                    "transformers models, named in --config. Writes OUT.jsonl, OUT.report.json, "
                    "OUT.reasons.jsonl; a rerun on the same output continues where it stopped. See docs/curation.md.")
    caption.add_argument("--manifest", required=True, help="JSONL manifest")
    caption.add_argument("--output", required=True, help="the captioned lines, a .jsonl file")
    caption.add_argument("--config", required=True, help="captioning YAML (backends, frames, prompts; "
                         "e.g. configs/captions.yaml)")
    caption.add_argument("--language", help="prompt language for lines without meta.language (default: the config's)")
    caption.add_argument("--concurrency", type=int, help="lines in flight at once (default: the config's)")
    caption.add_argument("--shard", help="K/N: caption only the K-th of N contiguous slices of the manifest "
                         "(join the parts with `kangaroo curate merge`)")
    caption.add_argument("--restart", action="store_true", help="discard the progress of an earlier run on this output")
    caption.set_defaults(handler=_caption_command)
    merge = curate_commands.add_parser(
        "merge", help="join the parts of `kangaroo curate --shard K/N` or `curate caption --shard K/N` "
                      "run on several machines",
        description="Checks that the parts are every shard of one manifest run with the same settings, each "
                    "finished, and writes their lines in manifest order to --output with one summed report.")
    merge.add_argument("parts", nargs="+", help="the parts' output .jsonl files")
    merge.add_argument("--output", required=True, help="the joined lines, a .jsonl file")
    merge.set_defaults(handler=_curate_merge_command)

    checkpoint = commands.add_parser("checkpoint", help="work with stage checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    consolidate = checkpoint.add_parser(
        "consolidate", help="write the model weights of a sharded (FSDP2) checkpoint folder to one safetensors file")
    consolidate.add_argument("checkpoint", help="a sharded checkpoint folder (e.g. checkpoints/step=1000.ckpt)")
    consolidate.add_argument("--output", help="the safetensors file (default: beside the folder, "
                             "step=1000.ckpt -> step=1000.safetensors)")
    consolidate.set_defaults(handler=_consolidate_command)

    export = commands.add_parser("export", help="write a self-contained model folder from a stage or checkpoint",
                                 description="Writes config, safetensors weights, tokenizer with chat template, "
                                             "preprocessing and generation defaults into --output.")
    export.add_argument("source", help="a stage folder, a checkpoint file or a sharded checkpoint folder")
    export.add_argument("--output", required=True, help="the model folder to write")
    export.add_argument("--config", help="the stage file that trained it (default: the stage folder's stage.yaml)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    export.set_defaults(handler=_export_command)

    chat = commands.add_parser("chat", help="talk to a model folder about a video, tokens streamed",
                               description="Interactive unless --query is given. Inside a session: /video PATH, "
                                           "/image PATH, /reset, /quit.")
    _add_model_arguments(chat)
    media = chat.add_mutually_exclusive_group()
    media.add_argument("--video", help="the video to talk about")
    media.add_argument("--image", help="an image instead")
    chat.add_argument("--query", help="ask this, print the answer and exit")
    chat.add_argument("--cache-mb", type=float, default=1024.0, help=CACHE_HELP)
    chat.add_argument("--history", help="a JSON file that keeps the conversation; resumed when it exists")
    chat.add_argument("--max-new-tokens", type=int, help="default: the model folder's")
    chat.add_argument("--temperature", type=float, help="0 decodes greedily (default: the model folder's)")
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.set_defaults(handler=_chat_command)

    serve = commands.add_parser("serve", help="serve a model folder over the OpenAI chat completions API",
                                description="POST /v1/chat/completions (text, image_url and video_url parts, "
                                            "stream: true) and GET /v1/models, on FastAPI + uvicorn.")
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients name (default: the folder's name)")
    serve.add_argument("--allowed-media-root", action="append",
                       help="a folder whose files requests may name by path (repeatable; default: none)")
    serve.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (off by default)")
    serve.add_argument("--max-media-mb", type=float, default=64.0, help="largest media file or data: URL (default 64)")
    serve.add_argument("--max-frames", type=int, help="most frames a request may ask for (default: the folder's "
                                                      "sampling maximum)")
    serve.add_argument("--allow-media-host", action="append", default=[],
                       help="with --allow-remote-media: a host, address or network (10.0.0.0/8) media may come "
                            "from although it is loopback, link-local or private (repeatable; default: none)")
    serve.add_argument("--max-tokens", type=int, help="most new tokens a request may ask for (default: the folder's "
                                                      "max_new_tokens); more is a 400")
    serve.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds a request may take from its arrival (default 300); then the model is freed "
                            "and the client gets a 408")
    serve.add_argument("--cache-mb", type=float, default=1024.0, help=CACHE_HELP)
    serve.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    serve.add_argument("--max-batch-tokens", type=int, default=65536,
                       help="most tokens the running rows' KV caches may reach: rows x (cache length + most "
                            "new tokens a row may still decode) (default 65536)")
    serve.add_argument("--batch-wait-ms", type=float, default=100.0,
                       help="how long a batch with room waits for requests still being read or decoded "
                            "(default 100; 0: never; nothing waits when no request is on its way)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=_serve_command)

    demo = commands.add_parser("demo", help="a web chat page about a video (Streamlit)",
                               description="Upload or pick a video, watch it, ask over several rounds; regenerate "
                                           "and reset. Never fetches a URL and never runs a shell command.")
    _add_model_arguments(demo)
    demo.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    demo.add_argument("--port", type=int, default=8501)
    demo.add_argument("--max-upload-mb", type=int, default=200, help="largest upload (default 200 MB)")
    demo.add_argument("--examples", help="a folder of videos offered to pick from")
    demo.add_argument("--temperature", type=float, help="0 decodes greedily (default: the model folder's)")
    demo.set_defaults(handler=_demo_command)

    from kangaroo.evaluation.benchmarks import READERS

    evaluate = commands.add_parser("eval", help="score a model folder on a video benchmark",
                                   description="Greedy decoding, at most 16 new tokens, the option letter read from "
                                               "the reply (none: wrong, listed). Writes OUT/results.json and "
                                               "OUT/samples.jsonl; a rerun resumes.")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--benchmark", required=True, choices=sorted(READERS),
                          help="the data file's layout (manifest: the project's task: mcq lines)")
    evaluate.add_argument("--data", required=True, help="the questions: a JSON list or JSON lines")
    evaluate.add_argument("--videos", help="the folder video paths are relative to (default: the data file's)")
    evaluate.add_argument("--output", required=True, help="folder for results.json and samples.jsonl")
    evaluate.add_argument("--mode", choices=("generate", "likelihood"), default="generate",
                          help="generate a reply (default) or score each option letter")
    evaluate.add_argument("--frames", type=int, help="sample this many frames uniformly (default: the model folder's)")
    evaluate.add_argument("--fps", type=float, help="sample at this rate instead")
    evaluate.add_argument("--devices", type=int, default=1, help="processes splitting the questions (default 1)")
    evaluate.add_argument("--shard", help=argparse.SUPPRESS)
    evaluate.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_eval_command, argv=None)

    recipe = commands.add_parser("recipe", help="run or inspect a chain of stages").add_subparsers(
        dest="recipe_command", required=True)
    run = recipe.add_parser("run", help="run the stages in order; re-running skips done stages and resumes")
    run.add_argument("recipe", help="a recipe file (recipes/*.yaml)")
    run.add_argument("--workdir", help="where stages, state and summary go (default: the recipe's workdir)")
    part = run.add_mutually_exclusive_group()
    part.add_argument("--only", metavar="STAGE", help="run this stage alone (its init_from must be done)")
    part.add_argument("--until", metavar="STAGE", help="run up to and including this stage")
    run.add_argument("--restart-from", metavar="STAGE", help="redo this stage and every later one")
    run.add_argument("--prepare-workers", type=int, default=1, help="processes for data preparation")
    run.add_argument("--rehearse", action="store_true", help="run the recipe's own stage files at tiny scale on CPU "
                     "processes: tiny models, a small synthetic world, few steps (every change printed)")
    run.add_argument("--devices", type=int, help="processes of a rehearsal (default 2)")
    several = run.add_argument_group("several nodes", "start the same command on every node; node 0 leads, the "
                                     "others follow it stage by stage (docs/training.md, Several machines)")
    several.add_argument("--num-nodes", type=int, help="nodes of the allocation (default: SLURM_NNODES, else 1); "
                         "each stage's fit gets trainer.num_nodes")
    several.add_argument("--node-rank", type=int, help="this node's rank (default: NODE_RANK, else SLURM_NODEID)")
    several.add_argument("--coordinator-port", type=int,
                         help="where node 0's runner listens for the others (default: MASTER_PORT + 1)")
    several.add_argument("--node-timeout", type=float, default=120.0,
                         help="seconds without a sign of life after which a node counts as dead and the stage "
                         "stops on every node (default: 120)")
    run.set_defaults(handler=_recipe_run_command)
    show = recipe.add_parser("show", help="print every stage fully resolved (configs merged)")
    show.add_argument("recipe")
    show.add_argument("--workdir")
    show.set_defaults(handler=_recipe_show_command)
    return parser


def _close_process_group() -> None:
    """Destroys the process group after a fit that ended well on every process. Left to the
    interpreter's exit, gloo's worker threads can outlive the objects they hold and the process
    dies with SIGABRT ("terminate called without an active exception") after its work is done;
    under ``torchrun`` the other node's agent then waits out its exit barrier. Only on success: a
    process that failed may leave its peers inside a collective, where destroying the group hangs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in FIT_COMMANDS:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE
        from kangaroo.training.fit import KangarooCLI

        try:
            KangarooCLI(args=argv)  # None: LightningCLI reads sys.argv itself
        except SIGTERMException:  # the step finished and PreemptionCheckpoint saved
            return PREEMPTED_EXIT_CODE
        except Exception as err:
            outage = storage.unreachable_store(err)  # past the retry budget; earlier checkpoints are intact
            if outage is None:
                raise
            print(f"kangaroo: error: {outage}", file=sys.stderr)
            return 1
        _close_process_group()
        return 0
    args = build_parser().parse_args(words)
    if getattr(args, "command", None) == "eval":
        args.argv = words[1:]
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a failed eval shard or stage, named in the message
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
