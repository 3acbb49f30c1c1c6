"""The rehearsal: a paper-scale recipe's own stage files, run at tiny scale on a few CPU processes.

``kangaroo recipe run recipes/kangaroo-8b.yaml --rehearse --devices 2`` keeps every setting of
the 8B stage files (the FSDP2 strategy with its bf16 compute and activation checkpointing, the
accumulation that follows from the global batch, packing, validation and checkpoint cadence in
optimizer steps, the RoPE overrides, ``attn_implementation: auto``, the frame format, ``init_from``
chained through the stages' weights) and swaps only what cannot run on a CPU: the model's sizes
for the tiny ones (``configs/kangaroo-tiny/<stage>.yaml``), the data for a small synthetic world's,
the step counts (scaled down) and the accelerator. The recipe is derived by code from the real one,
never kept as a copy: a change to an 8B stage file that breaks a run breaks the rehearsal, and
``tests/test_rehearsal.py`` runs it. Every override is printed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from kangaroo.recipe.spec import Recipe, RecipeError, Stage
from kangaroo.training.stage_file import read_stage_yaml

TINY_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "kangaroo-tiny")
REHEARSAL_WORLD = {"images": 48, "short_videos": 24, "dense_videos": 16, "instruction_videos": 33,
                   "long_videos": 16, "val_short": 6, "val_long": 6, "llm_steps": 2, "llm_batch": 8, "vision_steps": 2}
"""The synthetic world of a rehearsal: a few dozen clips per stage (33 instruction clips: with the
8B file's 4 loader workers, stage 4's two shares pack into 16 and 15 rows), and a tokenizer, LLM and ViT
barely pre-trained (``kangaroo.world.WorldConfig``): a rehearsal proves that the stages run, not
that they learn (the tiny recipe does that)."""
STEPS = 3
"""Optimizer steps of a stage whose length is given in steps (stages 1-3 of the 8B files)."""
EPOCHS = {"4-instruction-tuning": 1.5}
"""Epochs of a stage whose length is given in epochs, where the rehearsal changes them: stage 4
runs past its first epoch's end, where uneven shares meet the accumulation window."""
MAX_ACCUMULATE = 4
"""The rehearsal's micro-batches per step on ``REFERENCE_PROCESSES``: the 8B file's accumulation on
its 8 GPUs, at most this."""
REFERENCE_PROCESSES = 2
"""The rehearsal's global batch is the one of this many processes (as the 8B files' global batch is
the one of 8 GPUs): on another count that divides it the accumulation follows; on one that does
not, the global batch is that count's (``--devices`` x rows x accumulation)."""
CADENCE = 2
"""Checkpoint and validation cadence, in optimizer steps."""


def _tiny_config(name: str) -> dict[str, Any]:
    path = os.path.normpath(os.path.join(TINY_CONFIGS, f"{name}.yaml"))
    if not os.path.isfile(path):
        raise RecipeError(f"the rehearsal swaps in the tiny stage of the same name, {path}, which does not exist")
    return read_stage_yaml(path)


def _scaled_callbacks(callbacks: Any) -> list[Any]:
    scaled = []
    for callback in copy.deepcopy(callbacks or []):
        args = callback.get("init_args") if isinstance(callback, dict) else None
        if isinstance(args, dict) and "every_n_train_steps" in args:
            args["every_n_train_steps"] = CADENCE
        scaled.append(callback)
    return scaled


def stage_overrides(stage: Stage, devices: int, world: str) -> dict[str, Any]:
    """What the rehearsal changes in ``stage``'s file (dotted keys, as a recipe's ``overrides``)."""
    config = read_stage_yaml(stage.config)
    tiny = _tiny_config(stage.name)
    trainer, data, tiny_data = config.get("trainer", {}), config.get("data", {}), tiny["data"]
    architecture, tiny_architecture = config["model"]["architecture"], tiny["model"]["architecture"]
    overrides: dict[str, Any] = {"trainer.accelerator": "cpu", "trainer.devices": devices}
    # sizes and sources are the tiny model's; how the parts run (attention kernel, drop path) the file's
    vision = {**copy.deepcopy(tiny_architecture["vision_tower"]),
              **{k: v for k, v in architecture["vision_tower"].items() if k in ("drop_path",)}}
    language = {**{k: v for k, v in architecture["language_model"].items() if k not in ("pretrained", "transformers_config")},
                **copy.deepcopy(tiny_architecture["language_model"])}
    loads = bool(config["model"].get("load_pretrained"))  # stage 1; later stages start from init_from
    vision["pretrained"] = f"{world}/vision.safetensors" if loads else None
    language["pretrained"] = f"{world}/llm" if loads else None
    overrides.update({"model.architecture.vision_tower": vision, "model.architecture.language_model": language,
                      "model.architecture.visual_tokens": copy.deepcopy(tiny_architecture["visual_tokens"])})
    if "patchify" in architecture and "patchify" in tiny_architecture:
        overrides["model.architecture.patchify"] = copy.deepcopy(tiny_architecture["patchify"])
    prepare = copy.deepcopy(tiny_data["prepare"])
    for kept in ("frame_format", "frame_quality"):  # how frames are stored is the 8B file's
        if kept in data.get("prepare", {}):
            prepare[kept] = data["prepare"][kept]
    prepare["tokenizer"] = f"{world}/tokenizer"
    overrides.update({"data.prepare": prepare, "data.max_tokens": tiny_data["max_tokens"],
                      "data.pad_id": tiny_data["pad_id"], "model.optimizer.warmup_steps": 0})
    rows = min(int(data.get("rows_per_batch", 1)), int(tiny_data.get("rows_per_batch", 1)))
    overrides["data.rows_per_batch"] = rows
    if data.get("global_batch"):  # the accumulation the file has on its 8 GPUs, at most MAX_ACCUMULATE
        gpus = int(trainer.get("devices", 8)) * int(trainer.get("num_nodes", 1))
        accumulate = max(1, min(MAX_ACCUMULATE, data["global_batch"] // (gpus * int(data.get("rows_per_batch", 1)))))
        reference = REFERENCE_PROCESSES if (REFERENCE_PROCESSES * accumulate) % devices == 0 else devices
        overrides["data.global_batch"] = reference * rows * accumulate
    if data.get("epochs") is not None:
        if stage.name in EPOCHS:
            overrides["data.epochs"] = EPOCHS[stage.name]
    else:
        overrides["trainer.max_steps"] = STEPS
    if data.get("validate_every_steps") is not None:
        overrides["data.validate_every_steps"] = CADENCE
    if trainer.get("callbacks"):
        overrides["trainer.callbacks"] = _scaled_callbacks(trainer["callbacks"])
    return overrides


def rehearsal(recipe: Recipe, devices: int, world: str) -> tuple[Recipe, list[str]]:
    """The rehearsal of ``recipe`` on ``devices`` CPU processes with its synthetic world in
    ``world`` (generated when missing), and one line per override."""
    if devices < 1:
        raise RecipeError(f"--devices must be positive, got {devices}")
    world = os.path.abspath(world)
    stages, notes = [], []
    for stage in recipe.stages:
        overrides = stage_overrides(stage, devices, world)
        original = read_stage_yaml(stage.config)
        for key, value in list(overrides.items()):
            before = _lookup(original, key)
            if before == value:
                del overrides[key]
            else:
                notes.append(f"[{stage.name}] {key}: {_short(before)} -> {_short(value)}")
        overrides.update(stage.overrides)  # the recipe's own overrides stay the recipe's
        prepare = {split: f"{world}/{stage.name}-{split}.jsonl" for split in ("train", "val")}
        stages.append(dataclasses.replace(stage, overrides=overrides, prepare=prepare))
    rehearsed = dataclasses.replace(recipe, name=f"{recipe.name}-rehearsal", stages=stages, world=world,
                                    world_config=dict(REHEARSAL_WORLD))
    return rehearsed, notes


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return "(unset)"
        node = node[key]
    return node


def _short(value: Any, width: int = 90) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."
