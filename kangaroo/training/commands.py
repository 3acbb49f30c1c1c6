"""Entries of the ``kangaroo`` command that read a stage file: ``model summary``, ``data prepare``,
``data stats`` and ``checkpoint consolidate``.

Each is a typed function: ``kangaroo.cli`` registers it through jsonargparse, so its flags,
``--help``, ``--config`` and ``--print_config`` come from the signature and the docstring. Each
returns the process's exit code; bad input raises ``ValueError`` (exit 2).
"""

from __future__ import annotations

import json as json_module
import os
import sys
from typing import Literal

from kangaroo.data.manifest import parse_shard
from kangaroo.modules.sizes import MODEL_SIZES, named_config

SizeName = Literal[tuple(sorted(MODEL_SIZES))]  # type: ignore[valid-type]


def model_summary(stage: str | None = None, model: SizeName | None = None, image_size: int | None = None,
                  no_patchify: bool = False, json: bool = False) -> int:
    """Parameters per part and visual tokens per frame (no weights loaded).

    Args:
        stage: a stage file (configs/*/N-*.yaml): its model and trainable parts, instead of a named size
        model: a named size (default kangaroo-8b)
        image_size: resolution for a named size (default: its stage 3-5 size)
        no_patchify: a named size without patchify (stages 1-2)
        json: print one JSON object
    """
    from kangaroo.modules.summary import format_summary, model_summary as summarize_model, summarize_config

    if stage:
        if model is not None or image_size is not None or no_patchify:
            raise ValueError("--model, --image_size and --no_patchify name a size; --stage reads one from a stage "
                             "file: give one or the other")
        import torch

        from kangaroo.training.stage_file import load_stage_file

        module = load_stage_file(stage, ("model",))["model"]
        with torch.device("meta"):
            module.configure_model()
        summary = summarize_model(module.model)
    else:
        overrides: dict = {}
        if image_size is not None:
            overrides["image_size"] = image_size
        if no_patchify:
            overrides["patchify"] = False
        summary = summarize_config(named_config(model or "kangaroo-8b", **overrides))
    print(json_module.dumps(summary) if json else format_summary(summary))
    return 0


def prepare_stage_data(*, manifest: str, stage: str, split: Literal["train", "val"] = "train",
                       output: str | None = None, workers: int = 1, strict: bool = False, overwrite: bool = False,
                       allowed_root: list[str] | None = None, shard: str | None = None,
                       start_method: Literal["spawn", "forkserver"] = "spawn") -> int:
    """Decode, sample, resize and tokenize a manifest into LitData chunks, as a stage's data section says.

    Args:
        manifest: JSONL manifest (see docs/data.md)
        stage: the stage file whose data this is (its data.prepare section)
        split: write to the stage's data.train_dir or data.val_dir
        output: output folder for the chunks and rejects.jsonl (default: from --split)
        workers: decoding processes
        strict: fail on any rejected sample
        overwrite: replace a non-empty output folder
        allowed_root: folders media must live under (repeatable; default: the manifest's folder)
        shard: K/N: prepare only slice K of N into OUTPUT/parts/K-of-N (one machine each; then
            `kangaroo data merge OUTPUT`)
        start_method: how the decoding processes start (forkserver where the caller holds threads)
    """
    from kangaroo.data.prepare import NothingUsable, prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    sections = load_stage_file(stage)
    module, data = sections["model"], sections["data"]
    if data.prepare is None:
        raise ValueError(f"{stage}: no `data.prepare:` section saying how to prepare this stage's data")
    output = output or (data.hparams.train_dir if split == "train" else data.hparams.val_dir)
    if output is None:
        raise ValueError(f"{stage}: no data.{split}_dir and no --output")
    part = parse_shard(shard)
    if part is not None and part[1] < 2:
        raise ValueError(f"--shard {shard}: N must be at least 2 (without --shard, one pass writes the dataset)")
    try:
        report = prepare_dataset(manifest, output, data.prepare, visual_layout(module.architecture),
                                 workers=workers, strict=strict, overwrite=overwrite, allowed_roots=allowed_root,
                                 shard=part, start_method=start_method)
    except NothingUsable as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1
    print(report.summary(), flush=True)
    return 0


def epoch_stats(directory: str, *, stage: str, devices: int | None = None, accumulate: int | None = None,
                epochs: int = 1) -> int:
    """Records, tokens, packed rows and optimizer steps of an epoch of prepared data at a stage's
    budget, on N processes.

    Args:
        directory: prepared data (local or s3://)
        stage: the stage file (its data section and trainer's accumulation)
        devices: processes of the run (default: the stage's devices x num_nodes)
        accumulate: micro-batches per optimizer step (default: from the stage's data.global_batch, else its
            trainer.accumulate_grad_batches)
        epochs: epochs to show (their order, so their rows, differ)
    """
    from kangaroo.data.stats import cached_record_tokens, epoch_plan
    from kangaroo.training.stage_file import load_stage_file, read_stage_yaml

    trainer = read_stage_yaml(stage).get("trainer") or {}
    hp = load_stage_file(stage, ("data",))["data"].hparams
    nodes = int(trainer.get("num_nodes", 1))
    devices = devices or int(trainer.get("devices", 1)) * nodes
    if not accumulate and hp.global_batch:  # as the fit derives it (KangarooDataModule.apply_schedule)
        if hp.global_batch % (devices * hp.rows_per_batch):
            raise ValueError(f"data.global_batch ({hp.global_batch} rows) is not a multiple of {devices} processes x "
                             f"data.rows_per_batch {hp.rows_per_batch}")
        accumulate = hp.global_batch // (devices * hp.rows_per_batch)
    accumulate = accumulate or int(trainer.get("accumulate_grad_batches", 1))
    tokens = cached_record_tokens(directory)
    for epoch in range(1, epochs + 1):
        plan = epoch_plan(directory, hp.max_tokens, packing=hp.packing, rows_per_batch=hp.rows_per_batch,
                          buffer_size=hp.buffer_size, shuffle=hp.shuffle, seed=hp.seed, num_workers=hp.num_workers,
                          processes=devices, nodes=nodes if devices % nodes == 0 else 1, accumulate=accumulate,
                          epoch=epoch, tokens=tokens)
        print(f"epoch {epoch} of {directory} at {stage}'s budget, on {devices} processes "
              f"with {max(hp.num_workers, 1)} loader worker(s) each:\n{plan.summary()}")
    return 0


def consolidate(checkpoint: str, *, output: str | None = None) -> int:
    """Write the model weights of a sharded (FSDP2) checkpoint folder to one safetensors file.

    Args:
        checkpoint: a sharded checkpoint folder (e.g. checkpoints/step=1000.ckpt)
        output: the safetensors file (default: beside the folder, step=1000.ckpt -> step=1000.safetensors)
    """
    from kangaroo.training.weights import consolidate_checkpoint

    output = output or os.path.splitext(checkpoint.rstrip("/"))[0] + ".safetensors"
    print(f"weights of {checkpoint} written to {consolidate_checkpoint(checkpoint, output)}")
    return 0
