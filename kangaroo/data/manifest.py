"""The JSONL manifest: one training sample per line, validated before anything is decoded.

A line holds an ``id``, at most one media item (``video`` or ``image``: a path relative to the
manifest, an absolute path, or ``s3://...``), and either ``conversations`` or a task that a
template turns into one:

    {"id": "v1", "video": "clips/a.mp4",
     "conversations": [{"role": "user", "content": "<video>\\nWhat happens?"},
                       {"role": "assistant", "content": "A red circle moves left."}],
     "meta": {"duration": 12.0, "category": "shapes", "language": "en", "task": "open_qa"}}
    {"id": "c1", "video": "clips/b.mp4", "task": "caption", "caption": "A blue square appears."}
    {"id": "q1", "video": "clips/c.mp4", "task": "mcq", "question": "What colour is the circle?",
     "options": ["red", "blue", "green", "yellow"], "answer": "A"}

``<video>`` or ``<image>`` in a user turn marks where the media goes; without it the media
precedes the first user turn's text. ``meta`` is free-form and kept.

A preference pair (a preference stage's data) holds two replies to the same media and prompt,
the prompt as ``prompt`` or as ``conversations`` that end with the user's turn:

    {"id": "p1", "video": "clips/a.mp4", "prompt": "What colour is the shape?",
     "chosen": "The shape is red.", "rejected": "The shape is blue."}
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

MEDIA_MARKERS = ("<video>", "<image>")
ROLES = ("system", "user", "assistant")

CAPTION_PROMPTS = {
    "en": ["Describe the video.", "What happens in this video?", "Give a short caption of the video."],
    "zh": ["描述这个视频。", "这个视频里发生了什么？", "请为视频写一句简短的描述。"],
}
IMAGE_CAPTION_PROMPTS = {
    "en": ["Describe the image.", "What is in this picture?"],
    "zh": ["描述这张图片。", "图片里有什么？"],
}
MCQ_SUFFIX = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接回答选项的字母。",
}
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass
class Reject:
    id: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "reason": self.reason}, ensure_ascii=False)


@dataclass
class ManifestSample:
    id: str
    media_type: str | None
    """``video``, ``image`` or ``None`` (text only)."""
    media_path: str | None
    """Absolute local path or ``s3://`` URL."""
    conversations: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, str]] | None = None
    """A preference pair's other conversation: the same prompt, the rejected reply (the chosen one
    ends ``conversations``)."""


def parse_shard(text: str | None, flag: str = "--shard") -> tuple[int, int] | None:
    """``"K/N"`` (slice K of N of a manifest, for one of N machines) as ``(K, N)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"{flag} must be K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"{flag} {text}: K must lie in 0..N-1")
    return index, count


def read_manifest(path: str, allowed_roots: list[str] | None = None) -> Iterator[ManifestSample | Reject]:
    """Yields a ``ManifestSample`` per valid line and a ``Reject`` (with its reason) per bad one.

    ``allowed_roots``: directories (or ``s3://bucket/prefix``) media must live under; default:
    the manifest's own directory.
    """
    base, roots = manifest_roots(path, allowed_roots)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            yield parse_line(line, number, base, roots)


def manifest_roots(path: str, allowed_roots: list[str] | None = None) -> tuple[str, list[str]]:
    """The folder relative media paths start from, and the roots media must live under."""
    base = os.path.dirname(os.path.abspath(path))
    return base, [_normalise_root(r) for r in (allowed_roots or [base])]


def read_record(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(the line's JSON object, None)``, or ``(what was read, the reason it is unusable)``:
    malformed JSON, not an object, or no non-empty string ``id``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} at column {err.colno}"
    if not isinstance(record, dict):
        return None, "a manifest line must be a JSON object"
    if not isinstance(record.get("id"), str) or not record["id"]:
        return record, "missing or empty 'id'"
    return record, None


def parse_line(line: str, number: int, base: str, roots: list[str]) -> ManifestSample | Reject:
    record, problem = read_record(line)
    if problem is not None:
        return Reject(f"line {number}", problem)
    try:
        return _to_sample(record, record["id"], base, roots)
    except ValueError as err:
        return Reject(record["id"], str(err))


def _to_sample(record: dict[str, Any], sample_id: str, base: str, roots: list[str]) -> ManifestSample:
    media = [key for key in ("video", "image") if record.get(key)]
    if len(media) > 1:
        raise ValueError("a sample holds at most one media item, got both 'video' and 'image'")
    media_type = media[0] if media else None
    media_path = _resolve_media(record[media_type], base, roots) if media_type else None
    meta = dict(record.get("meta") or {})
    if record.get("task") and "task" not in meta:
        meta["task"] = record["task"]
    if "chosen" in record or "rejected" in record:
        conversations, rejected = preference_conversations(record)
        meta.setdefault("task", "preference")
        return ManifestSample(sample_id, media_type, media_path, conversations, meta, rejected)
    conversations = record.get("conversations")
    if conversations is None:
        conversations = apply_task_template(record, media_type, meta.get("language", "en"), sample_id)
    check_conversations(conversations)
    return ManifestSample(sample_id, media_type, media_path, conversations, meta)


def preference_conversations(record: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected conversation of a preference pair: its prompt (``prompt``, or
    ``conversations`` ending with the user's turn) followed by each reply."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not all(isinstance(reply, str) and reply.strip() for reply in (chosen, rejected)):
        raise ValueError("a preference pair needs non-empty 'chosen' and 'rejected' replies")
    if chosen.strip() == rejected.strip():
        raise ValueError("a preference pair's 'chosen' and 'rejected' replies are the same")
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        prompt = [{"role": "user", "content": record["prompt"]}]
    else:
        prompt = record.get("conversations")
        if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
                or prompt[-1].get("role") != "user":
            raise ValueError("a preference pair needs a 'prompt', or 'conversations' that end with the user's turn")
    pair = [prompt + [{"role": "assistant", "content": reply}] for reply in (chosen, rejected)]
    for conversation in pair:
        check_conversations(conversation)
    return pair[0], pair[1]


def _normalise_root(root: str) -> str:
    return root.rstrip("/") + "/" if root.startswith("s3://") else os.path.realpath(root) + os.sep


def _resolve_media(value: Any, base: str, roots: list[str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"media path must be a string, got {value!r}")
    path = value if value.startswith("s3://") else os.path.realpath(os.path.join(base, value))
    if not any(path.startswith(root) for root in roots):
        raise ValueError(f"media path {value!r} is outside the allowed roots {[r.rstrip('/' + os.sep) for r in roots]}")
    return path


def check_conversations(conversations: Any) -> None:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"each turn needs a role in {ROLES} and string content, got {turn!r}")
    if not any(turn["role"] == "assistant" for turn in conversations):
        raise ValueError("conversation has no assistant turn, so nothing to learn")


def apply_task_template(record: dict[str, Any], media_type: str | None, language: str, sample_id: str) -> list[dict]:
    """Turns a ``caption`` or ``mcq`` record into a conversation. The prompt wording is chosen by
    a generator seeded with the sample id, so a re-run gives the same text."""
    task = record.get("task")
    rng = random.Random(sample_id)
    lang = language if language in CAPTION_PROMPTS else "en"
    if task == "caption":
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("caption task needs a non-empty 'caption'")
        prompts = IMAGE_CAPTION_PROMPTS if media_type == "image" else CAPTION_PROMPTS
        return [{"role": "user", "content": rng.choice(prompts[lang])}, {"role": "assistant", "content": caption}]
    if task == "mcq":
        return mcq_conversation(record, lang)
    raise ValueError(f"no 'conversations' and no known task template (task={task!r}; known: caption, mcq)")


def mcq_conversation(record: dict[str, Any], lang: str) -> list[dict]:
    question, options, answer = record.get("question"), record.get("options"), record.get("answer")
    if not isinstance(question, str) or not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError("mcq task needs a 'question' and 2-10 'options'")
    letters = OPTION_LETTERS[: len(options)]
    if answer not in letters:
        raise ValueError(f"mcq answer must be one of {list(letters)}, got {answer!r}")
    lines = [question] + [f"{letter}. {option}" for letter, option in zip(letters, options)] + [MCQ_SUFFIX[lang]]
    return [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": answer}]
