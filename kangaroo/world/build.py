"""The tiny world written whole: its media and manifests (``render``), its tokenizer
(``tokenizer``) and the pre-trained stand-ins the tiny recipe starts from (``pretrain``).

Everything is drawn from one seed, so the same ``--seed`` gives the same files. Held-out media
are rendered from a different seed stream than the training media, so no held-out clip is a
training clip. The answers need the pixels: a question's wording never gives its answer away,
and the options are always listed in the same order, so the text alone is no better than chance.

Layout of ``DIR``::

    media/{train,val}/...           mp4 clips and png images
    <stage>-{train,val}.jsonl       one manifest per curriculum stage and split
    6-preference-{train,val}.jsonl  preference pairs for the optional preference stage
    tokenizer/                      a byte-level BPE trained on the world's text
    llm/                            the tiny language model, pre-trained on the world's chats
    vision.safetensors              the tiny ViT, pre-trained on the world's frames
    held-out.videomme.jsonl         the last stage's held-out questions in Video-MME's layout
    world.json                      seed, sizes and counts: what was generated
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from kangaroo.world.pretrain import pretrain_llm, pretrain_vision
from kangaroo.world.render import (PREFERENCE_STAGE, STAGES, World, WorldConfig, corpus_of, described_chats,
                                   manifest_path, preference_pairs, stage_records)
from kangaroo.world.tokenizer import write_tokenizer


def synth(*, output: str = "data/kangaroo-tiny", seed: int = 0, overwrite: bool = False) -> int:
    """Write the tiny synthetic world: videos, manifests for all five stages, held-out questions,
    tokenizer and text-trained tiny LLM.

    Args:
        output: the world's folder
        seed: the world's seed (its clips, questions and splits)
        overwrite: replace a world made with other settings
    """
    info = synthesize(output, WorldConfig(seed=seed), overwrite=overwrite)
    for name, count in info["manifests"].items():
        print(f"{name:<40}{count:>7}")
    return 0


def synthesize(output: str, config: WorldConfig | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Writes the whole tiny world into ``output`` (see the module docstring). Refuses a folder
    that already holds a different world unless ``overwrite``."""
    from tqdm.auto import tqdm

    config = config or WorldConfig()
    marker = os.path.join(output, "world.json")
    if os.path.exists(marker):
        existing = json.load(open(marker, encoding="utf-8"))
        if existing.get("config") == json.loads(json.dumps(asdict(config))):  # tuples read back as lists
            if not os.path.exists(os.path.join(output, BENCHMARK_NAME)):  # a world written before it existed
                write_benchmark_layout(output)
            if not os.path.exists(manifest_path(output, PREFERENCE_STAGE, "val")):  # likewise
                write_preference_manifests(output)
            return existing
        if not overwrite:
            raise ValueError(f"{output} holds a world made with other settings; pass --overwrite to replace it")
    for split in ("train", "val"):
        os.makedirs(os.path.join(output, "media", split), exist_ok=True)
    world = World(output, config)
    total = (config.images + config.short_videos + config.dense_videos + config.instruction_videos
             + config.long_videos + config.val_short + config.val_long)
    with tqdm(total=total, desc="rendering the tiny world", unit="media") as bar:
        records = stage_records(world, bar.update)
    counts = {}
    for stage, splits in records.items():
        for split, lines in splits.items():
            with open(manifest_path(output, stage, split), "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            counts[f"{stage}/{split}"] = len(lines)
    write_benchmark_layout(output)
    counts.update(write_preference_manifests(output))
    train_records = [r for splits in records.values() for r in splits["train"]]
    tokenizer = write_tokenizer(output, corpus_of(train_records))
    held_out = records[STAGES[-1]]["val"]
    language = pretrain_llm(output, tokenizer, described_chats(train_records, world.facts), config,
                             list(zip(described_chats(held_out, world.facts), [r["meta"]["category"] for r in held_out])))
    vision = pretrain_vision(output, config)
    info = {"config": json.loads(json.dumps(asdict(config))), "manifests": counts,
            "llm_pretraining": language, "vision_pretraining": vision}
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return info


BENCHMARK_NAME = "held-out.videomme.jsonl"
PREFERENCE_TRAIN_PAIRS = 900
"""Training pairs: every long clip's questions (count, when), then short ones (colour, shape,
direction) up to this many."""


def write_preference_manifests(output: str) -> dict[str, int]:
    """Writes the preference stage's manifests from the curriculum's (``preference_pairs``):
    training pairs from stages 4 and 5's training questions, held-out pairs from the held-out
    questions (held-out clips)."""

    def read(stage: str, split: str) -> list[dict]:
        with open(manifest_path(output, stage, split), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    long = [r for r in read(STAGES[4], "train") if r["id"].startswith("train-long-")]
    short = [r for r in read(STAGES[3], "train") if r.get("task") == "mcq"]
    splits = {"train": preference_pairs(long + short)[:PREFERENCE_TRAIN_PAIRS],
              "val": preference_pairs(read(STAGES[-1], "val"))}
    counts = {}
    for split, lines in splits.items():
        with open(manifest_path(output, PREFERENCE_STAGE, split), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        counts[f"{PREFERENCE_STAGE}/{split}"] = len(lines)
    return counts


def write_benchmark_layout(output: str) -> str:
    """Writes the last stage's held-out questions again in Video-MME's published layout
    (``videoID``, ``question_id``, ``duration``, ``domain``, ``sub_category``, ``task_type``,
    ``question``, ``options`` as "A. ...", ``answer``), so that a recipe scores the tiny model
    through the same reader and prompt template as the real benchmark. ``duration`` is the
    question's category (short or long clips); ``task_type`` the kind of question."""
    from kangaroo.data.manifest import OPTION_LETTERS

    lines = []
    with open(manifest_path(output, STAGES[-1], "val"), encoding="utf-8") as manifest:
        for line in manifest:
            record = json.loads(line)
            if record.get("task") != "mcq":
                continue
            lines.append({"videoID": record["video"], "question_id": record["id"],
                          "duration": record["meta"]["category"], "domain": "tiny world",
                          "sub_category": record["meta"]["language"], "task_type": record["id"].rsplit("-", 1)[-1],
                          "question": record["question"],
                          "options": [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, record["options"])],
                          "answer": record["answer"]})
    path = os.path.join(output, BENCHMARK_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return path
