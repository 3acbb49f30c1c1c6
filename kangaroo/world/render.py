"""The tiny world's scenes: coloured shapes that appear, move and disappear, rendered as real video
files and images, with the captions, questions and chats of every curriculum stage.

Everything is drawn from one seed, so the same ``--seed`` gives the same files. Held-out media
are rendered from a different seed stream than the training media, so no held-out clip is a
training clip. The answers need the pixels: a question's wording never gives its answer away,
and the options are always listed in the same order, so the text alone is no better than chance.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kangaroo.data.manifest import CAPTION_PROMPTS, IMAGE_CAPTION_PROMPTS, MCQ_SUFFIX, OPTION_LETTERS
from kangaroo.data.video import write_video

log = logging.getLogger(__name__)

STAGES = ("1-image-pretrain", "2-video-pretrain", "3-pretrain-refinement", "4-instruction-tuning",
          "5-long-video-tuning")
SHAPES = ("ring", "square", "triangle", "bar")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 220, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ZH = {"ring": "圆环", "square": "正方形", "triangle": "三角形", "bar": "横条", "red": "红色", "green": "绿色",
      "blue": "蓝色", "yellow": "黄色", "left": "左", "right": "右", "up": "上", "down": "下"}
COUNTS = {"en": ("one", "two", "three", "four"), "zh": ("一个", "两个", "三个", "四个")}
PREFERENCE_STAGE = "6-preference"
"""The optional stage after the curriculum: preference pairs (``preference_pairs``)."""
REPLIES = {
    "colour": {"en": "The shape is {}.", "zh": "这个形状是{}的。"},
    "shape": {"en": "It is a {}.", "zh": "是{}。"},
    "direction": {"en": "It moves {}.", "zh": "它向{}移动。"},
    "count": {"en": "Shapes that appear: {}.", "zh": "出现了{}形状。"},
    "when": {"en": "It appears at {}.", "zh": "它在{}出现。"},
}
"""A preference pair's reply around the option it names, per kind of question (the id's last word)."""


@dataclass
class WorldConfig:
    """Sizes of the tiny world (defaults: the tiny recipe)."""

    seed: int = 0
    size: int = 64
    """Frame side in pixels (the stages resize to their own resolution)."""
    fps: int = 4
    short_seconds: float = 4.0
    long_events: int = 4
    """Windows of a long clip; each holds one event (a shape moving for all but its last second)
    or stays empty."""
    long_event_seconds: float = 5.0
    images: int = 600
    short_videos: int = 400
    dense_videos: int = 300
    instruction_videos: int = 500
    long_videos: int = 300
    val_short: int = 60
    val_long: int = 60
    zh_fraction: float = 0.25
    llm_steps: int = 250
    """Steps of the tiny LLM's pre-training on the world's chats told in words (no pixels)."""
    llm_batch: int = 32
    """Conversations per step of the tiny LLM's pre-training."""
    vision_model: str = "eva02_tiny_patch14_224"
    """The timm ViT pre-trained on the world's frames (the stage configs' ``timm:`` tower)."""
    vision_depth: int = 4
    """Blocks of the tiny ViT; the stage configs build it with ``timm_kwargs: {depth: 4,
    global_pool: token}``."""
    vision_image_size: int = 56
    """Resolution of the ViT's pre-training (stage 1's; later stages resample the tower)."""
    vision_steps: int = 600
    """Steps of the tiny ViT's pre-training on rendered frames (colour, shape, position)."""


# -- drawing ----------------------------------------------------------------------------------

def draw(canvas: np.ndarray, shape: str, colour: str, cx: float, cy: float, radius: float) -> None:
    """Draws a filled shape centred at ``(cx, cy)`` in place."""
    h, w = canvas.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "ring":
        mask = (dx**2 + dy**2 <= radius**2) & (dx**2 + dy**2 >= (radius * 0.55) ** 2)
    elif shape == "square":
        mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    elif shape == "bar":
        mask = (np.abs(dx) <= radius * 1.1) & (np.abs(dy) <= radius * 0.4)
    elif shape == "triangle":
        mask = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    canvas[mask] = COLOURS[colour]


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    level = rng.integers(10, 50)
    canvas = np.full((size, size, 3), level, np.uint8)
    canvas += rng.integers(0, 8, (size, size, 3), dtype=np.uint8)  # faint noise, not a flat colour
    return canvas


# -- the world --------------------------------------------------------------------------------

class World:
    """Renders media into ``root/media/<split>`` and returns manifest records."""

    def __init__(self, root: str, config: WorldConfig) -> None:
        self.root = root
        self.config = config
        self.facts: dict[str, list[dict]] = {}
        """What each rendered media shows, by its manifest path: the tiny LLM's text pre-training
        reads these in words (``described``); the manifests never carry them."""

    def _rng(self, split: str, kind: str, index: int) -> tuple[random.Random, np.random.Generator]:
        key = f"{self.config.seed}:{split}:{kind}:{index}"
        return random.Random(key), np.random.default_rng(stable_seed(key))

    def _media(self, split: str, name: str) -> tuple[str, str]:
        rel = os.path.join("media", split, name)
        full = os.path.join(self.root, "media", split, name)
        return rel, full

    def language(self, rng: random.Random) -> str:
        return "zh" if rng.random() < self.config.zh_fraction else "en"

    def image(self, split: str, index: int) -> dict[str, Any]:
        from PIL import Image

        rng, nrng = self._rng(split, "image", index)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size = self.config.size
        canvas = background(size, nrng)
        draw(canvas, shape, colour, rng.uniform(18, size - 18), rng.uniform(18, size - 18), rng.uniform(10, 16))
        rel, full = self._media(split, f"image-{index:05d}.png")
        self.facts[rel] = [{"shape": shape, "colour": colour}]
        Image.fromarray(canvas).save(full)
        lang = self.language(rng)
        caption = caption_of(self.facts[rel], lang)
        return {"id": f"{split}-image-{index}", "image": rel, "task": "caption", "caption": caption,
                "meta": {"language": lang, "category": "image"}}

    def short_clip(self, split: str, kind: str, index: int, events: int = 1) -> tuple[str, list[dict], random.Random]:
        """A clip of ``events`` shapes shown one after another, each moving in one direction."""
        rng, nrng = self._rng(split, kind, index)
        cfg = self.config
        per_event = int(cfg.short_seconds * cfg.fps)
        frames, facts = [], []
        base = background(cfg.size, nrng)
        for _ in range(events):
            shape, colour, direction = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
            facts.append({"shape": shape, "colour": colour, "direction": direction})
            frames += self._moving(base, shape, colour, direction, per_event, rng)
        rel, full = self._media(split, f"{kind}-{index:05d}.mp4")
        write_video(full, np.stack(frames), fps=cfg.fps)
        self.facts[rel] = facts
        return rel, facts, rng

    def _moving(self, base: np.ndarray, shape: str, colour: str, direction: str, count: int,
                rng: random.Random) -> list[np.ndarray]:
        # Shapes set off from the middle of the frame and travel towards one side.
        size = self.config.size
        radius = rng.uniform(9, 13)
        vx, vy = DIRECTIONS[direction]
        travel = size * 0.28
        cx0 = size / 2 + rng.uniform(-2, 2)
        cy0 = size / 2 + rng.uniform(-2, 2)
        out = []
        for t in range(count):
            frame = base.copy()
            progress = t / max(1, count - 1)
            draw(frame, shape, colour, cx0 + vx * travel * progress, cy0 + vy * travel * progress, radius)
            out.append(frame)
        return out

    def long_clip(self, split: str, index: int, single: bool) -> tuple[str, list[dict], random.Random]:
        """``long_events`` windows of ``long_event_seconds``; some hold an event (a shape moving for
        all but the window's last second, distinct shapes), the others stay empty. ``single``: one
        event in a random window; otherwise a count drawn uniformly from one to ``long_events``.
        Questions ask how many shapes appear and when (``long_question``)."""
        rng, nrng = self._rng(split, "long", index)
        cfg = self.config
        base = background(cfg.size, nrng)
        count = 1 if single else rng.randint(1, cfg.long_events)
        windows = sorted(rng.sample(range(cfg.long_events), count))
        shapes = rng.sample(SHAPES, count)
        per_event = int(cfg.long_event_seconds * cfg.fps)
        frames, facts = [], []
        for window in range(cfg.long_events):
            if window not in windows:
                frames += [base.copy() for _ in range(per_event)]
                continue
            shape = shapes[windows.index(window)]
            colour, direction = rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
            start = window * cfg.long_event_seconds
            facts.append({"shape": shape, "colour": colour, "direction": direction, "start": start,
                          "end": start + cfg.long_event_seconds - 1, "window": window})
            frames += self._moving(base, shape, colour, direction, per_event - cfg.fps, rng)
            frames += [base.copy() for _ in range(cfg.fps)]  # one empty second after each event
        rel, full = self._media(split, f"long-{index:05d}.mp4")
        write_video(full, np.stack(frames), fps=cfg.fps)
        self.facts[rel] = facts
        return rel, facts, rng


def stable_seed(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


# -- captions and questions ------------------------------------------------------------------

def caption_of(facts: list[dict], lang: str) -> str:
    if "direction" not in facts[0]:  # a still image
        fact = facts[0]
        return f"A {fact['colour']} {fact['shape']}." if lang == "en" else f"一个{ZH[fact['colour']]}的{ZH[fact['shape']]}。"
    if lang == "zh":
        parts = [f"一个{ZH[f['colour']]}的{ZH[f['shape']]}向{ZH[f['direction']]}移动" for f in facts]
        return "，然后".join(parts) + "。"
    parts = [f"a {f['colour']} {f['shape']} moves {f['direction']}" for f in facts]
    text = ", then ".join(parts) + "."
    return text[0].upper() + text[1:]


def description_of(facts: list[dict], lang: str) -> str:
    """What a media shows, told in words for the tiny LLM's text pre-training: the caption, and
    for long clips how many shapes appear and when each does, what the long questions ask."""
    if "start" not in facts[0]:
        return caption_of(facts, lang)
    count = COUNTS[lang][len(facts) - 1]
    if lang == "zh":
        return f"出现了{count}形状。" + "".join(
            f"{f['start']:g}到{f['end']:g}秒，一个{ZH[f['colour']]}的{ZH[f['shape']]}向{ZH[f['direction']]}移动。"
            for f in facts)
    return f"{count.capitalize()} shape{'s' if len(facts) > 1 else ''} appear{'' if len(facts) > 1 else 's'}. " + " ".join(
        f"From {f['start']:g} to {f['end']:g} s, a {f['colour']} {f['shape']} moves {f['direction']}." for f in facts)


def short_question(facts: dict, kind: str, lang: str) -> tuple[str, list[str], str]:
    """A question about a one-shape clip: ``(question, options, answer letter)``; options keep
    one fixed order, so the letter depends on the clip alone."""
    if kind == "colour":
        options = list(COLOURS)
        question = {"en": "What colour is the shape?", "zh": "这个形状是什么颜色？"}[lang]
        answer = facts["colour"]
    elif kind == "shape":
        options = list(SHAPES)
        question = {"en": "Which shape is shown?", "zh": "视频里是什么形状？"}[lang]
        answer = facts["shape"]
    else:
        options = list(DIRECTIONS)
        question = {"en": "Which way does the shape move?", "zh": "这个形状向哪里移动？"}[lang]
        answer = facts["direction"]
    shown = options if lang == "en" else [ZH[o] for o in options]
    return question, shown, OPTION_LETTERS[options.index(answer)]


def long_question(facts: list[dict], kind: str, lang: str, config: WorldConfig) -> tuple[str, list[str], str]:
    """A question about a long clip: ``count`` (how many shapes appear) or ``when`` (in which
    window the one shape of a single-event clip appears). Options keep one fixed order."""
    if kind == "count":
        question = {"en": "How many shapes appear in the video?", "zh": "视频里出现了几个形状？"}[lang]
        return question, list(COUNTS[lang]), OPTION_LETTERS[len(facts) - 1]
    if kind != "when" or len(facts) != 1:
        raise ValueError(f"a long clip is asked 'count', or 'when' about its only event; got {kind!r} for "
                         f"{len(facts)} events")
    question = {"en": "When does the shape appear?", "zh": "这个形状什么时候出现？"}[lang]
    step = config.long_event_seconds
    unit = {"en": " s", "zh": "秒"}[lang]
    options = [f"{w * step:g}-{(w + 1) * step:g}{unit}" for w in range(config.long_events)]
    return question, options, OPTION_LETTERS[facts[0]["window"]]


def mcq(sample_id: str, media: str, question: str, options: list[str], answer: str, lang: str,
        category: str) -> dict[str, Any]:
    return {"id": sample_id, "video": media, "task": "mcq", "question": question, "options": options,
            "answer": answer, "meta": {"language": lang, "category": category}}


def open_answer(facts: dict, kind: str, lang: str) -> tuple[str, str]:
    if kind == "shape":
        return ({"en": "What shape appears in the video?", "zh": "视频里出现了什么形状？"}[lang],
                {"en": f"A {facts['shape']}.", "zh": f"一个{ZH[facts['shape']]}。"}[lang])
    return ({"en": "What colour is the shape, and where does it go?", "zh": "这个形状是什么颜色，往哪里移动？"}[lang],
            {"en": f"It is {facts['colour']} and it moves {facts['direction']}.",
             "zh": f"它是{ZH[facts['colour']]}的，向{ZH[facts['direction']]}移动。"}[lang])


# -- the manifests of each stage -------------------------------------------------------------

def stage_records(world: World, progress: Callable[[int], None]) -> dict[str, dict[str, list[dict]]]:
    cfg = world.config
    out: dict[str, dict[str, list[dict]]] = {stage: {"train": [], "val": []} for stage in STAGES}

    def short_mcqs(split: str, index: int, media: str, facts: dict, rng: random.Random, kinds) -> list[dict]:
        records = []
        for kind in kinds:
            lang = world.language(rng)
            question, options, answer = short_question(facts, kind, lang)
            records.append(mcq(f"{split}-short-{index}-{kind}", media, question, options, answer, lang, "short"))
        return records

    def long_mcqs(split: str, index: int, media: str, facts: list[dict], rng: random.Random, kinds) -> list[dict]:
        records = []
        for kind in kinds:
            lang = world.language(rng)
            question, options, answer = long_question(facts, kind, lang, cfg)
            records.append(mcq(f"{split}-long-{index}-{kind}", media, question, options, answer, lang, "long"))
        return records

    for i in range(cfg.images):
        out["1-image-pretrain"]["train"].append(world.image("train", i))
        progress(1)
    for i in range(cfg.short_videos):
        media, facts, rng = world.short_clip("train", "clip", i)
        lang = world.language(rng)
        out["2-video-pretrain"]["train"].append({"id": f"train-clip-{i}", "video": media, "task": "caption",
                                                 "caption": caption_of(facts, lang),
                                                 "meta": {"language": lang, "category": "short"}})
        progress(1)
    for i in range(cfg.dense_videos):
        media, facts, rng = world.short_clip("train", "dense", i, events=2)
        lang = world.language(rng)
        out["3-pretrain-refinement"]["train"].append({"id": f"train-dense-{i}", "video": media, "task": "caption",
                                                      "caption": caption_of(facts, lang),
                                                      "meta": {"language": lang, "category": "short"}})
        progress(1)
    instruction = out["4-instruction-tuning"]["train"]
    for i in range(cfg.instruction_videos):
        media, facts, rng = world.short_clip("train", "inst", i)
        fact = facts[0]
        instruction += short_mcqs("train", i, media, fact, rng, ("colour", "shape", "direction"))
        lang = world.language(rng)
        first_q, first_a = open_answer(fact, "shape", lang)
        second_q, second_a = open_answer(fact, "motion", lang)
        if rng.random() < 0.5:  # a multi-round chat
            conversations = [{"role": "user", "content": "<video>\n" + first_q}, {"role": "assistant", "content": first_a},
                             {"role": "user", "content": second_q}, {"role": "assistant", "content": second_a}]
        else:  # open QA
            conversations = [{"role": "user", "content": second_q}, {"role": "assistant", "content": second_a}]
        instruction.append({"id": f"train-inst-{i}-chat", "video": media, "conversations": conversations,
                            "meta": {"language": lang, "category": "short", "task": "open_qa"}})
        progress(1)
    long_train = out["5-long-video-tuning"]["train"]
    for i in range(cfg.long_videos):  # every other clip holds one event: asked when, and how many
        single = i % 2 == 1
        media, facts, rng = world.long_clip("train", i, single)
        long_train += long_mcqs("train", i, media, facts, rng, ("count", "when") if single else ("count",))
        progress(1)
    # Short questions keep stage 5 balanced across lengths, as in the paper.
    long_train += [r for r in instruction if r.get("task") == "mcq"][: len(long_train) // 2]

    # Held-out: rendered apart (split "val" seeds), multiple-choice only.
    val_short, val_long = [], []
    for i in range(cfg.val_short):
        media, facts, rng = world.short_clip("val", "clip", i)
        val_short += short_mcqs("val", i, media, facts[0], rng, (("colour", "shape", "direction")[i % 3],))
        progress(1)
    for i in range(cfg.val_long):  # half asked how many shapes appear, half when the only one does
        single = i % 2 == 1
        media, facts, rng = world.long_clip("val", i, single)
        val_long += long_mcqs("val", i, media, facts, rng, ("when",) if single else ("count",))
        progress(1)
    images_val = [world.image("val", i) for i in range(max(8, cfg.val_short // 4))]
    out["1-image-pretrain"]["val"] = images_val
    for stage in STAGES[1:]:
        out[stage]["val"] = val_short + val_long
    return out


def chats_of(records: list[dict]) -> list[list[dict]]:
    """The conversation of every record, task templates applied (media markers kept)."""
    from kangaroo.data.manifest import apply_task_template

    return [record.get("conversations") or apply_task_template(
        record, "image" if "image" in record else "video", record["meta"]["language"], record["id"])
        for record in records]


def described_chats(records: list[dict], facts: dict[str, list[dict]]) -> list[list[dict]]:
    """Each record's conversation with its media replaced by a sentence saying what the media
    shows: text the LLM can learn to read and answer from, the way an instruct LLM has learnt
    to answer from what its prompt says, before it ever sees a pixel."""
    from kangaroo.data.manifest import MEDIA_MARKERS

    out = []
    for record, chat in zip(records, chats_of(records)):
        shown = facts.get(record.get("video") or record.get("image"))
        if shown is None:
            continue
        text = description_of(shown, record["meta"]["language"])
        chat = [dict(turn) for turn in chat]
        marked = next((m for turn in chat for m in MEDIA_MARKERS if m in turn["content"]), None)
        if marked:
            for turn in chat:
                turn["content"] = turn["content"].replace(marked, text)
        else:
            first_user = next(turn for turn in chat if turn["role"] == "user")
            first_user["content"] = text + "\n" + first_user["content"]
        out.append(chat)
    return out


def corpus_of(records: list[dict]) -> list[str]:
    """Every text the world can show the model, templates included (for the tokenizer)."""
    texts = [p for prompts in (CAPTION_PROMPTS, IMAGE_CAPTION_PROMPTS) for lang in prompts.values() for p in lang]
    texts += list(MCQ_SUFFIX.values())
    texts += [turn["content"] for chat in chats_of(records) for turn in chat]
    return texts


def preference_pairs(records: list[dict]) -> list[dict]:
    """A preference pair per multiple-choice record: the question asked openly, the true answer
    as a sentence (chosen) and the same sentence with one fact wrong (rejected): the colour,
    the shape, the direction, the count or the time, whichever the question asks, the wrong
    option drawn by the record's id. Built from the manifests alone, so an existing world gains
    its pairs without rendering anything again."""
    pairs = []
    for record in records:
        if record.get("task") != "mcq":
            continue
        kind, lang = record["id"].rsplit("-", 1)[-1], record["meta"]["language"]
        options, right = record["options"], OPTION_LETTERS.index(record["answer"])
        wrong = random.Random(f"{record['id']}:rejected").choice([i for i in range(len(options)) if i != right])
        reply = REPLIES[kind][lang]
        pairs.append({"id": f"{record['id']}-pair", "video": record["video"], "prompt": record["question"],
                      "chosen": reply.format(options[right]), "rejected": reply.format(options[wrong]),
                      "meta": {**record["meta"], "task": "preference", "wrong": kind}})
    return pairs


def manifest_path(output: str, stage: str, split: str) -> str:
    return os.path.join(output, f"{stage}-{split}.jsonl")


def random_frames(count: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` frames drawn like the world's: one shape (or, one time in ten, none) at a random
    place. Returns frames ``(n, size, size, 3)``, classes ``(n, 2)`` (colour, shape; 4 = none)
    and centres ``(n, 2)`` in [0, 1]."""
    frames = np.empty((count, size, size, 3), np.uint8)
    classes = np.full((count, 2), 4, np.int64)
    centres = np.full((count, 2), 0.5, np.float32)
    colours = list(COLOURS)
    for i in range(count):
        frames[i] = background(size, rng)
        if rng.random() < 0.1:
            continue
        colour, shape = rng.integers(4), rng.integers(4)
        r = rng.uniform(9, 14)  # the clips' sizes
        cx, cy = rng.uniform(1.15 * r, size - 1.15 * r, 2)  # whole: a shape cut by the border is ambiguous
        draw(frames[i], SHAPES[shape], colours[colour], cx, cy, r)
        classes[i] = colour, shape
        centres[i] = cx / size, cy / size
    return frames, classes, centres
