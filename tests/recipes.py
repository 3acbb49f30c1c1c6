"""Helpers for the recipe tests: recipe files over the tiny stages, the small world's size, and
the tiny chain with a few steps per stage."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "kangaroo-tiny"


def write_recipe(path: Path, stages: list[dict], name: str = "test-recipe", **extra) -> str:
    path.write_text(yaml.safe_dump({"name": name, "stages": stages, **extra}, sort_keys=False))
    return str(path)


def stage(number: int, init_from: str | None = None, **extra) -> dict:
    name = sorted(p.stem for p in TINY.glob("[1-9]-*.yaml"))[number - 1]
    entry = {"name": name, "config": str(TINY / f"{name}.yaml")}
    if init_from:
        entry["init_from"] = init_from
    return {**entry, **extra}


SMALL_WORLD = dict(images=24, short_videos=12, dense_videos=12, instruction_videos=10, long_videos=8,
                   val_short=6, val_long=6, llm_steps=10, vision_steps=5)


def chain_recipe(tmp_path: Path, world: str, stage3_steps: int = 3, count: int = 5, long_stage: int = 3) -> str:
    """The tiny recipe's first ``count`` stages with a few steps each, ``stage3_steps`` in stage
    ``long_stage``."""
    fast = {"trainer.val_check_interval": 2, "trainer.max_steps": 2, "data.prepare.tokenizer": "${world}/tokenizer",
            "trainer.enable_progress_bar": False,
            "trainer.callbacks": [{"class_path": "kangaroo.training.checkpoints.StageCheckpoint",
                                   "init_args": {"every_n_train_steps": 1, "save_last": True}}]}
    names = sorted(p.stem for p in TINY.glob("[1-9]-*.yaml"))[:count]
    stages = []
    for number, name in enumerate(names, 1):
        overrides = dict(fast)
        if number == 1:
            overrides["model.architecture.language_model.pretrained"] = "${world}/llm"
            overrides["model.architecture.vision_tower.pretrained"] = "${world}/vision.safetensors"
        if number == long_stage:
            overrides.update({"trainer.max_steps": stage3_steps, "trainer.val_check_interval": stage3_steps})
        extra = {}
        if number == 5:  # scored on its model folder, as the tiny recipe's last stage is
            extra["eval"] = [{"name": "held-out", "benchmark": "manifest", "data": f"${{world}}/{name}-val.jsonl"},
                             {"benchmark": "videomme", "data": "${world}/held-out.videomme.jsonl",
                              "videos": "${world}", "frames": 4}]
        stages.append(stage(number, init_from=names[number - 2] if number > 1 else None, overrides=overrides,
                            prepare={"train": f"${{world}}/{name}-train.jsonl", "val": f"${{world}}/{name}-val.jsonl"},
                            **extra))
    return write_recipe(tmp_path / "chain.yaml", stages, name="chain", world=world)
