"""``kangaroo curate caption``: video captions from frame captions, and image re-captioning
(paper §III-A, §III-C), against model servers.

Each video is split into ``frames.count`` equal segments and one frame is drawn from each
(seeded by the line's id, so a shard or a rerun draws the same frames); a multimodal model
captions each frame, and an LLM summarises the frame captions, in order and with their times,
into one video caption. The captioner and the summariser are drawn per video among those the
config lists, with their weights (the paper draws between two summarisers to avoid one model's
bias). Image lines are re-captioned by the captioner with the image prompt.

Backends: ``openai``, any OpenAI-compatible chat endpoint (vLLM, SGLang, ``kangaroo serve``,
``transformers serve``, a hosted API), through the ``openai`` client; ``transformers``, a local
model loaded into the process (a multimodal one as a captioner, a text one as a summariser).

Outputs beside ``OUT.jsonl`` (the captioned lines, in manifest order, each with ``caption`` and
``meta.captioning``: captioner, summariser, prompt hash, frame times and frame captions):
``OUT.report.json`` (lines captioned, failed by reason, skipped, requests, retries, tokens,
seconds, requests/s), ``OUT.reasons.jsonl`` (each failed or skipped line and why) and
``OUT.progress.jsonl``, the journal a rerun continues from.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as futures
import dataclasses
import hashlib
import io
import json
import os
import random
import string
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kangaroo.curate.filters import Item, LineError, SampleFilter, StopCuration, Verdict
from kangaroo.curate.pipeline import _append, _open_journal, check_shards, output_paths, shard_lines
from kangaroo.data.manifest import read_record

ROLES = ("captioners", "summarisers")
KINDS = ("openai", "transformers")

DEFAULT_PROMPTS: dict[str, dict[str, str]] = {
    # The paper's intent: a detailed, factual caption of what is visible, its length bounded.
    "frame": {
        "en": "Describe this video frame in at most {max_words} words: the main objects, their colours, shapes "
              "and positions, and what is happening. Describe only what is visible.",
        "zh": "用不超过{max_words}个字描述这一视频帧：主要物体、它们的颜色、形状和位置，以及正在发生什么。只描述可见的内容。",
    },
    "summary": {
        "en": "Below are captions of {count} frames taken in order from one video, each with its time in "
              "seconds:\n{captions}\nWrite one caption for the whole video in at most {max_words} words: what it "
              "shows and how it changes over time. Do not mention frames or captions.",
        "zh": "以下是从同一视频中按时间顺序抽取的{count}帧的描述，每条附有其时间（秒）：\n{captions}\n"
              "请用不超过{max_words}个字为整个视频写一段描述：视频展示了什么，以及随时间如何变化。不要提及帧或描述。",
    },
    "image": {
        "en": "Describe this image in detail in at most {max_words} words: the objects, their colours, shapes, "
              "positions and any text. Describe only what is visible.",
        "zh": "用不超过{max_words}个字详细描述这张图片：物体、颜色、形状、位置以及其中的文字。只描述可见的内容。",
    },
}
DEFAULT_MAX_WORDS = {"frame": 40, "summary": 120, "image": 100}
PLACEHOLDERS = {"frame": {"max_words", "time"}, "summary": {"captions", "count", "max_words"}, "image": {"max_words"}}
REQUIRED_PLACEHOLDERS = {"frame": set(), "summary": {"captions"}, "image": set()}


# -- the config ------------------------------------------------------------------------------


@dataclass
class BackendConfig:
    """One model a captioning run asks: ``kind: openai`` (``base_url``, ``model``, the API key
    read from the environment variable ``api_key_env``) or ``kind: transformers`` (``model``: a
    local folder or a Hugging Face id, on ``device``)."""

    name: str
    kind: str = "openai"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    weight: float = 1.0
    max_tokens: int = 256
    temperature: float = 0.0
    device: str = "cpu"

    def identity(self) -> dict[str, Any]:
        """What decides its replies (not where it runs): kept in the journal's header."""
        return {"name": self.name, "kind": self.kind, "model": self.model, "weight": self.weight,
                "max_tokens": self.max_tokens, "temperature": self.temperature}


@dataclass
class FrameSelection:
    strategy: str = "segments"
    """``segments`` (the paper): ``count`` equal segments, a seeded random frame in each;
    ``uniform``: the frame nearest the middle of each segment."""
    count: int = 5
    max_side: int = 768
    """Frames are scaled down (never up) to this longest side before they are sent."""
    jpeg_quality: int = 90


@dataclass
class CaptionConfig:
    captioners: list[BackendConfig]
    summarisers: list[BackendConfig]
    frames: FrameSelection = field(default_factory=FrameSelection)
    prompts: dict[str, dict[str, str]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PROMPTS)))
    max_words: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_WORDS))
    language: str = "en"
    """The prompts' language for lines without ``meta.language``."""
    concurrency: int = 8
    """Lines in flight at once (each asks its requests one after another)."""
    timeout_s: float = 60.0
    """Per request."""
    retries: int = 5
    """Per request, on timeouts, refused connections, 408, 429 and 5xx; past them the run stops."""
    backoff_s: float = 1.0
    """The first retry's wait; doubled for each next one, up to ``max_backoff_s``."""
    max_backoff_s: float = 30.0
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        return {"captioners": [b.identity() for b in self.captioners],
                "summarisers": [b.identity() for b in self.summarisers],
                "frames": dataclasses.asdict(self.frames), "prompts": self.prompts, "max_words": self.max_words,
                "seed": self.seed}


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def caption_config(raw: dict[str, Any], where: str = "caption config") -> CaptionConfig:
    """Builds and checks a captioning config from its YAML mapping."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a captioning config is a mapping")
    raw = dict(raw)
    for role in ROLES:
        entries = raw.get(role)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: `{role}:` must list at least one backend")
        raw[role] = [_build(BackendConfig, entry, f"{where}: {role}[{i}]") for i, entry in enumerate(entries)]
    if "frames" in raw:
        raw["frames"] = _build(FrameSelection, raw["frames"], f"{where}: frames")
    prompts = json.loads(json.dumps(DEFAULT_PROMPTS))
    for kind, texts in (raw.get("prompts") or {}).items():
        if kind not in DEFAULT_PROMPTS or not isinstance(texts, dict):
            raise ValueError(f"{where}: prompts are given per kind ({sorted(DEFAULT_PROMPTS)}) and language, got {kind!r}")
        prompts[kind].update(texts)
    raw["prompts"] = prompts
    raw["max_words"] = {**DEFAULT_MAX_WORDS, **(raw.get("max_words") or {})}
    config = _build(CaptionConfig, raw, where)
    check_config(config, where)
    return config


def check_config(config: CaptionConfig, where: str) -> None:
    """Raises ``ValueError`` naming what is wrong with ``config`` (``where``: the file or flag)."""
    for role in ROLES:
        backends = getattr(config, role)
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: {role} need distinct names, got {names}")
        for backend in backends:
            label = f"{where}: {role[:-1]} {backend.name!r}"
            if backend.kind not in KINDS:
                raise ValueError(f"{label}: unknown kind {backend.kind!r} (known: {', '.join(KINDS)})")
            if not backend.model:
                raise ValueError(f"{label}: no `model`")
            if backend.kind == "openai" and not backend.base_url:
                raise ValueError(f"{label}: an openai backend needs `base_url` (e.g. http://127.0.0.1:8000/v1)")
            if not backend.weight > 0:
                raise ValueError(f"{label}: weight must be positive, got {backend.weight}")
            if backend.max_tokens < 1:
                raise ValueError(f"{label}: max_tokens must be at least 1")
    frames = config.frames
    if frames.strategy not in ("segments", "uniform"):
        raise ValueError(f"{where}: frames.strategy must be segments or uniform, got {frames.strategy!r}")
    if frames.count < 1 or frames.max_side < 16:
        raise ValueError(f"{where}: frames.count must be at least 1 and frames.max_side at least 16")
    for kind, texts in config.prompts.items():
        for language, text in texts.items():
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: prompts.{kind}.{language} is empty")
            try:
                fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as err:
                raise ValueError(f"{where}: prompts.{kind}.{language}: {err} (write a literal brace as {{{{ or }}}})")
            unknown, missing = fields - PLACEHOLDERS[kind], REQUIRED_PLACEHOLDERS[kind] - fields
            if missing:
                raise ValueError(f"{where}: prompts.{kind}.{language} lacks the placeholder "
                                 f"{', '.join('{' + m + '}' for m in sorted(missing))} it needs")
            if unknown:
                raise ValueError(f"{where}: prompts.{kind}.{language} has unknown placeholders {sorted(unknown)} "
                                 f"(known: {sorted(PLACEHOLDERS[kind])})")
    lacking = [kind for kind, texts in config.prompts.items() if config.language not in texts]
    if lacking:
        raise ValueError(f"{where}: no {', '.join(lacking)} prompt for the default language {config.language!r}")
    for name, value in (("concurrency", config.concurrency), ("retries", config.retries + 1)):
        if value < 1:
            raise ValueError(f"{where}: {name} must be at least {1 if name == 'concurrency' else 0}")
    if not config.timeout_s > 0 or config.backoff_s < 0:
        raise ValueError(f"{where}: timeout_s must be positive and backoff_s not negative")


def load_caption_config(path: str) -> CaptionConfig:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ValueError(f"cannot read captioning config {path}: {err}") from err
    if isinstance(raw, dict) and "caption" in raw and "captioners" not in raw:
        raw = raw["caption"]  # a curation config with a caption section
    return caption_config(raw, path)


# -- backends --------------------------------------------------------------------------------


class LineFailure(Exception):
    """A reply that cannot be a caption (empty, refused, an error that retrying will not mend):
    the line is a counted failure, the run goes on."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class BackendUnavailable(StopCuration):
    """A backend that did not answer within its retries: the run stops, its journal intact."""


class _Retryable(Exception):
    pass


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint, asked through the ``openai`` client with its own
    retries off: ``Requests`` retries, so that every retry is counted in the report and the
    wait follows the config (the client's retries are invisible to the caller)."""

    def __init__(self, config: BackendConfig, timeout_s: float) -> None:
        try:
            import openai
        except ImportError:
            raise ValueError(f"backend {config.name!r} is an OpenAI-compatible endpoint, asked through the openai "
                             "client: pip install 'kangaroo[caption]'") from None

        self.config = config
        key = "EMPTY"  # servers without authentication ignore it; the client requires one
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ValueError(f"backend {config.name!r}: the environment variable {config.api_key_env} "
                                 "(api_key_env) is not set")
        self._openai = openai
        self.client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=timeout_s, max_retries=0)

    def complete(self, content: list[dict] | str) -> Reply:
        openai = self._openai
        try:
            response = self.client.chat.completions.create(
                model=self.config.model, messages=[{"role": "user", "content": content}],
                max_tokens=self.config.max_tokens, temperature=self.config.temperature)
        except (openai.APITimeoutError, openai.APIConnectionError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        except openai.APIStatusError as err:
            if err.status_code in (408, 429) or err.status_code >= 500:
                raise _Retryable(f"HTTP {err.status_code}: {_message(err)}") from None
            if err.status_code in (401, 403, 404):  # a wrong key, URL or model name: every line would fail
                raise BackendUnavailable(f"backend {self.config.name!r} ({self.config.base_url}) refused with HTTP "
                                         f"{err.status_code}: {_message(err)}; check its base_url, model and "
                                         "api_key_env") from None
            raise LineFailure(f"refused (HTTP {err.status_code})", _message(err)) from None
        choice = response.choices[0] if response.choices else None
        if choice is not None and choice.finish_reason == "content_filter":
            raise LineFailure("refused (content filter)", "")
        text = (choice.message.content or "").strip() if choice is not None else ""
        usage = response.usage
        return Reply(text, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(err)[:300]


class TransformersBackend:
    """A local model through ``transformers``, greedy at temperature 0. A captioner is a
    multimodal model (``AutoModelForImageTextToText`` and its ``AutoProcessor``: the image parts
    become images in its chat template); a summariser is a text model (``AutoModelForCausalLM``
    and its tokenizer's chat template). One generation at a time (a lock): lines share the model.
    Written with ``generate`` rather than transformers' ``pipeline``: the token counts for the
    report come straight from the tensors."""

    def __init__(self, config: BackendConfig, sees_images: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.config = config
        self.sees_images = sees_images
        try:
            if sees_images:
                self.processor = AutoProcessor.from_pretrained(config.model)
                if getattr(self.processor, "image_processor", None) is None:
                    raise ValueError("its folder has no image processor (a text-only model?)")
                self.tokenizer = self.processor.tokenizer
                model = AutoModelForImageTextToText.from_pretrained(config.model)
            else:
                self.processor = self.tokenizer = AutoTokenizer.from_pretrained(config.model)
                model = AutoModelForCausalLM.from_pretrained(config.model)
        except (OSError, ValueError) as err:
            kind = "multimodal (image-text-to-text)" if sees_images else "text (causal LM)"
            raise ValueError(f"backend {config.name!r}: cannot load {config.model} as a {kind} model: {err}") from None
        self.model = model.to(config.device).eval()
        self._lock = threading.Lock()

    def _messages(self, content: list[dict] | str) -> list[dict]:
        if isinstance(content, str):
            return [{"role": "user", "content": content}]
        if not self.sees_images:
            raise LineFailure("unsupported", f"backend {self.config.name!r} is a text model; it cannot see images")
        from PIL import Image

        parts = []
        for part in content:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
            else:
                parts.append({"type": "text", "text": part["text"]})
        return [{"role": "user", "content": parts}]

    def complete(self, content: list[dict] | str) -> Reply:
        import torch

        messages = self._messages(content)
        sampling = ({"do_sample": True, "temperature": self.config.temperature} if self.config.temperature > 0
                    else {"do_sample": False})
        # the tokenizer too under the lock: a fast tokenizer used by several threads at once raises
        with self._lock, torch.inference_mode():
            inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
            inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
            prompt = inputs["input_ids"].shape[1]
            out = self.model.generate(**inputs, max_new_tokens=self.config.max_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **sampling)
            new = out[0, prompt:]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Reply(text, int(prompt), int(new.numel()))


def make_backends(config: CaptionConfig) -> dict[tuple[str, str], Any]:
    """Every backend of ``config`` by ``(role, name)``: captioners see images, summarisers text."""
    return {(role, b.name): OpenAIBackend(b, config.timeout_s) if b.kind == "openai"
            else TransformersBackend(b, sees_images=role == "captioners")
            for role in ROLES for b in getattr(config, role)}


class Requests:
    """Asks backends with retries and backoff, and counts requests, retries, failures and
    tokens per backend (thread-safe: lines run in a pool of threads)."""

    def __init__(self, config: CaptionConfig, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self._lock = threading.Lock()
        self.stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def ask(self, backend, content: list[dict] | str) -> Reply:
        name = backend.config.name
        last = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                self._count(name, retries=1)
                wait = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)
                if self.stop.wait(wait * random.uniform(0.8, 1.2)):
                    break  # another line found a backend gone: no point waiting out this one's retries
            self._count(name, requests=1)
            try:
                reply = backend.complete(content)
            except _Retryable as err:
                last = str(err)
                continue
            except LineFailure:
                self._count(name, failures=1)
                raise
            self._count(name, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
            if not reply.text:
                self._count(name, failures=1)
                raise LineFailure("empty reply", f"{name} answered with no text")
            return reply
        self._count(name, failures=1)
        where = getattr(backend.config, "base_url", None) or backend.config.model
        raise BackendUnavailable(
            f"backend {name!r} ({where}) did not answer after {self.config.retries + 1} attempts: {last}")

    def totals(self) -> collections.Counter:
        """Every backend's counts summed."""
        with self._lock:
            return sum(self.stats.values(), collections.Counter())

    def _count(self, name: str, **counts: int) -> None:
        with self._lock:
            self.stats[name].update(counts)


# -- one line --------------------------------------------------------------------------------


def _draw(backends: list[BackendConfig], seed: int, key: str) -> BackendConfig:
    rng = random.Random(f"{seed}:{key}")
    return rng.choices(backends, weights=[b.weight for b in backends])[0]


def pick_frames(path: str, selection: FrameSelection, key: str, seed: int) -> list[tuple[float, bytes]]:
    """``[(time in seconds, JPEG bytes)]`` of the frames a video's caption is built from: one per
    segment, a random one (``segments``, drawn with ``seed`` and the line's ``key``) or the one
    nearest the segment's middle (``uniform``). Raises ``MediaError``."""
    import numpy as np

    from kangaroo.data.video import decode_frames, index_video

    index = index_video(path)
    times = np.asarray(index.times)
    rng = random.Random(f"{seed}:{key}:frames")
    chosen = []
    for segment in range(selection.count):
        start = index.duration * segment / selection.count
        end = index.duration * (segment + 1) / selection.count
        inside = np.flatnonzero((times >= start) & (times < end))
        if selection.strategy == "segments" and inside.size:
            chosen.append(int(rng.choice(list(inside))))
        else:  # uniform, or a segment shorter than a frame interval
            chosen.append(int(np.abs(times - (start + end) / 2).argmin()))
    frames = decode_frames(path, index, chosen, _Shrink(selection.max_side))
    return [(round(float(times[i]), 3), _jpeg(frame, selection.jpeg_quality)) for i, frame in zip(chosen, frames)]


class _Shrink:
    """Scales a decoded frame down (never up) to ``max_side`` as it is decoded."""

    def __init__(self, max_side: int) -> None:
        from kangaroo.data.transforms import FrameScaler

        self.max_side = max_side
        self.scaler = FrameScaler(max_side, "pad")

    def __call__(self, frame):
        return self.scaler(frame) if max(frame.shape[:2]) > self.max_side else frame


def _jpeg(frame, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _image_bytes(path: str, max_side: int, quality: int) -> bytes:
    import numpy as np

    from kangaroo.data.encode import read_image

    return _jpeg(np.ascontiguousarray(_Shrink(max_side)(read_image(path))), quality)


def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}


def prompt_hash(config: CaptionConfig, language: str, kinds: tuple[str, ...]) -> str:
    text = json.dumps({k: [config.prompts[k].get(language), config.max_words[k]] for k in kinds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Captioner:
    """Captions one manifest line (``caption_line``); shared by the threads of a run."""

    def __init__(self, config: CaptionConfig, backends: dict[str, Any], requests: Requests, base: str,
                 language: str, out_dir: str | None) -> None:
        self.config, self.backends, self.requests = config, backends, requests
        self.base, self.language, self.out_dir = base, language, out_dir

    def _language(self, record: dict) -> str:
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        language = meta.get("language") or self.language
        return language if language in self.config.prompts["summary"] else self.language

    def _prompt(self, kind: str, language: str, **values) -> str:
        texts = self.config.prompts[kind]
        return texts.get(language, texts[self.language]).format(max_words=self.config.max_words[kind], **values)

    def caption_line(self, number: int, record: dict) -> dict:
        """The journal entry of one line: ``captioned`` with the record to write, ``failed`` or
        ``skipped`` with the reason. Raises ``BackendUnavailable``."""
        from kangaroo.data.video import MediaError

        entry = {"line": number, "id": record["id"]}
        media = [k for k in ("video", "image") if record.get(k)]
        if not media:
            return {**entry, "status": "skipped", "reason": "no media: the line has no video or image"}
        if len(media) > 1 or not isinstance(record[media[0]], str):
            return {**entry, "status": "failed", "reason": "bad media: one video or image path per line"}
        kind, value = media[0], record[media[0]]
        if "://" in value:
            return {**entry, "status": "failed", "reason": f"object-store media: {value} is not read here; "
                                                           "caption a local copy"}
        path = os.path.normpath(os.path.join(self.base, value))
        language = self._language(record)
        seed, key = self.config.seed, record["id"]
        captioner = _draw(self.config.captioners, seed, f"{key}:captioner")
        provenance: dict[str, Any] = {"captioner": captioner.name, "captioner_model": captioner.model,
                                      "language": language}
        try:
            if kind == "image":
                data = _image_bytes(path, self.config.frames.max_side, self.config.frames.jpeg_quality)
                reply = self.requests.ask(self.backends[("captioners", captioner.name)],
                                          [_image_part(data), {"type": "text", "text": self._prompt("image", language)}])
                caption = reply.text
                provenance["prompt_sha256"] = prompt_hash(self.config, language, ("image",))
            else:
                frames = pick_frames(path, self.config.frames, key, seed)
                described = []
                for time_s, data in frames:
                    text = self._prompt("frame", language, time=f"{time_s:g}")
                    reply = self.requests.ask(self.backends[("captioners", captioner.name)],
                                              [_image_part(data), {"type": "text", "text": text}])
                    described.append({"time": time_s, "caption": reply.text})
                summariser = _draw(self.config.summarisers, seed, f"{key}:summariser")
                listed = "\n".join(f"{i + 1}. ({d['time']:g} s) {d['caption']}" for i, d in enumerate(described))
                caption = self.requests.ask(self.backends[("summarisers", summariser.name)],
                                            self._prompt("summary", language, captions=listed, count=len(described))).text
                provenance.update(summariser=summariser.name, summariser_model=summariser.model,
                                  prompt_sha256=prompt_hash(self.config, language, ("frame", "summary")),
                                  frames=described)
        except MediaError as err:
            return {**entry, "status": "failed", "reason": f"unreadable media: {err}"}
        except LineFailure as err:
            return {**entry, "status": "failed", "reason": str(err)}
        except StopCuration:
            raise
        except Exception as err:  # noqa: BLE001 - one line's surprise (a malformed reply...) is counted, not fatal
            return {**entry, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
        out = dict(record)
        if isinstance(record.get("caption"), str):
            provenance["replaced_caption"] = record["caption"]
        out["caption"] = caption
        if self.out_dir is not None and not os.path.isabs(value):  # relative to the manifest: now to the output
            out[kind] = os.path.relpath(path, self.out_dir)
        if "task" not in out and "conversations" not in out:
            out["task"] = "caption"
        out["meta"] = {**(record.get("meta") if isinstance(record.get("meta"), dict) else {}), "captioning": provenance}
        return {**entry, "status": "captioned", "record": out}


class Captioning(SampleFilter):
    """Captioning as a step of ``kangaroo curate``'s chain: after the filters that look at the
    video, before ``CaptionRepetitionFilter`` and the dataset filters. Each line it reaches is
    captioned as ``kangaroo curate caption`` captions it (the same config, draws and
    provenance); a line that cannot be captioned is an ``error`` with the reason; a backend gone
    past its retries stops the run (finished lines stay in the journal). Requests in flight are
    the run's ``--workers``: for many in flight, run ``kangaroo curate caption`` on its own.

    Args:
        config: the captioning YAML (``configs/captions.yaml``).
        language: the prompts' language for lines without ``meta.language`` (default: the config's).
    """

    name = "captioning"

    def __init__(self, config: str, language: str | None = None) -> None:
        self.config = config
        self.language = language
        loaded = load_caption_config(config)
        self._config = dataclasses.replace(loaded, language=language) if language else loaded
        check_config(self._config, config)
        self._captioner: Captioner | None = None

    def settings(self) -> dict[str, Any]:
        # what decides the captions, not where the servers are: a moved server keeps a run resumable
        return {"config": self.config, "captioning": self._config.identity(), "language": self._config.language}

    def applies(self, item: Item) -> bool:
        return item.video is not None or isinstance(item.record.get("image"), str)

    def setup(self, workspace: str) -> None:
        from kangaroo.curate import pipeline

        config = self._config
        # relative image paths are read against the manifest's folder, as the pipeline reads videos
        self._captioner = Captioner(config, make_backends(config), Requests(config, threading.Event()),
                                    pipeline._WORKER.get("base", os.getcwd()), config.language, None)

    def check(self, item: Item) -> Verdict:
        record = dict(item.record)
        if item.video is not None:
            record["video"] = item.video  # a clip SceneCut cut, or the line's own video, as a local path
        before = self._captioner.requests.totals()
        entry = self._captioner.caption_line(item.line, record)
        if entry["status"] != "captioned":
            raise LineError(entry["reason"])
        captioned = {**entry["record"], **{k: item.record[k] for k in ("video", "image") if k in item.record}}
        # this line's requests, retries and tokens, summed into the filter's entry of the report
        counts = {k: v - before[k] for k, v in self._captioner.requests.totals().items() if k != "failures"}
        return Verdict(True, items=[Item(item.id, captioned, item.video, item.line)], counts=counts)


# -- a run -----------------------------------------------------------------------------------


class CaptioningStopped(RuntimeError):
    """A backend stayed unreachable: the run stopped; every finished line is in the journal."""


@dataclass
class CaptionReport:
    data: dict[str, Any]

    def summary(self) -> str:
        d = self.data
        lines = [f"captioned {d['captioned']} of {d['lines']} lines of {d['manifest']} into {d['output']}: "
                 f"{d['failed']} failed, {d['skipped']} skipped ({d['resumed']} from an earlier run)",
                 f"  {d['requests']} requests ({d['retries']} retries), {d['prompt_tokens']} prompt + "
                 f"{d['completion_tokens']} completion tokens in {d['seconds']:.1f} s: {d['requests_per_s']:.2f} "
                 f"requests/s, {d['lines_per_s']:.2f} lines/s"]
        for reason, count in d["failures"].items():
            lines.append(f"  failed: {count} x {reason}")
        return "\n".join(lines)


def caption_manifest(manifest: str, output: str, config: CaptionConfig, language: str | None = None,
                     shard: tuple[int, int] | None = None, restart: bool = False,
                     progress: bool = True) -> CaptionReport:
    """Captions every line of ``manifest`` (or its ``shard``) into ``output``. A rerun on the
    same output continues from its journal without asking finished lines again; another manifest
    or other settings are refused unless ``restart``. Raises ``CaptioningStopped`` when a backend
    stays unreachable past its retries (the report and journal are written first)."""
    if not output.endswith(".jsonl"):
        raise ValueError(f"--output must be a .jsonl file, got {output}")
    if language is not None:
        config = dataclasses.replace(config, language=language)
        check_config(config, "--language")
    paths = output_paths(os.path.abspath(output))
    if os.path.realpath(manifest) in {os.path.realpath(p) for p in paths.values()}:
        raise ValueError(f"--output {output} would overwrite the manifest {manifest}; choose another file")
    try:
        with open(manifest, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise ValueError(f"cannot read manifest {manifest}: {err}") from err
    os.makedirs(os.path.dirname(paths["manifest"]), exist_ok=True)
    texts = raw.decode("utf-8", errors="replace").splitlines()
    numbers = shard_lines([n for n, text in enumerate(texts, start=1) if text.strip()], shard)
    header = {"kind": "header", "manifest_sha256": hashlib.sha256(raw).hexdigest(), "captioning": config.identity(),
              "language": config.language, "shard": list(shard) if shard else None}
    entries = _open_journal(paths["progress"], header, restart)
    resumed = len([n for n in numbers if n in entries])
    stop = threading.Event()
    requests = Requests(config, stop)
    captioner = Captioner(config, make_backends(config), requests, os.path.dirname(os.path.abspath(manifest)), config.language,
                          os.path.dirname(paths["manifest"]))
    started = time.perf_counter()
    stopped: str | None = None
    with open(paths["progress"], "a", encoding="utf-8") as journal:
        todo = []
        for number in numbers:
            if number in entries:
                continue
            record, problem = read_record(texts[number - 1])
            if problem is not None:
                _append(journal, entries, {"line": number, "id": f"line {number}", "status": "failed",
                                           "reason": f"bad line: {problem}"})
                continue
            todo.append((number, record))
        stopped = _run(todo, captioner, config.concurrency, stop, journal, entries, progress)
    seconds = time.perf_counter() - started
    report = _finish(manifest, output, paths, [entries[n] for n in numbers if n in entries], len(numbers), resumed,
                     requests, seconds, stopped, shard)
    if stopped is not None:
        raise CaptioningStopped(f"{stopped}. {report.data['captioned']} lines captioned, {report.data['failed']} "
                                f"failed and {len(numbers) - report.data['done']} left; every finished line is in "
                                f"{paths['progress']}: run the same command again to continue")
    return report


def _run(todo, captioner: Captioner, concurrency: int, stop: threading.Event, journal, entries, progress) -> str | None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="caption", unit="line", disable=not progress or not todo, dynamic_ncols=True)
    counts = collections.Counter()
    stopped = None
    with futures.ThreadPoolExecutor(concurrency, thread_name_prefix="caption") as pool:
        pending: set[futures.Future] = set()
        queue = iter(todo)

        def fill() -> None:
            while not stop.is_set() and len(pending) < 2 * concurrency:
                item = next(queue, None)
                if item is None:
                    return
                pending.add(pool.submit(captioner.caption_line, *item))

        fill()
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                try:
                    entry = future.result()
                except BackendUnavailable as err:
                    stopped = stopped or str(err)
                    stop.set()  # lines not started stay unasked; those running finish or fail fast
                    continue
                _append(journal, entries, entry)
                counts[entry["status"]] += 1
                bar.set_postfix(counts, refresh=False)
                bar.update()
            if stop.is_set():
                for future in pending:
                    future.cancel()
            fill()
    bar.close()
    return stopped


def failure_kind(reason: str) -> str:
    """The counted kind of a failure: its reason up to the first colon."""
    return reason.split(":", 1)[0]


def _finish(manifest, output, paths, entries, lines, resumed, requests: Requests, seconds, stopped, shard) -> CaptionReport:
    captioned = [e for e in entries if e["status"] == "captioned"]
    failed = [e for e in entries if e["status"] == "failed"]
    skipped = [e for e in entries if e["status"] == "skipped"]
    if stopped is None:
        with open(paths["manifest"], "w", encoding="utf-8") as handle:
            for entry in captioned:
                handle.write(json.dumps(entry["record"], ensure_ascii=False) + "\n")
    with open(paths["reasons"], "w", encoding="utf-8") as handle:
        for entry in failed + skipped:
            handle.write(json.dumps({k: entry[k] for k in ("line", "id", "status", "reason")}, ensure_ascii=False) + "\n")
    totals = requests.totals()
    data = {
        "manifest": manifest, "output": output, "shard": list(shard) if shard else None, "lines": lines,
        "done": len(entries), "captioned": len(captioned), "failed": len(failed), "skipped": len(skipped),
        "resumed": resumed, "failures": dict(collections.Counter(failure_kind(e["reason"]) for e in failed)),
        "skips": dict(collections.Counter(failure_kind(e["reason"]) for e in skipped)),
        "requests": totals["requests"], "retries": totals["retries"], "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"], "seconds": round(seconds, 3),
        "requests_per_s": round(totals["requests"] / seconds, 3) if seconds > 0 else 0.0,
        "lines_per_s": round((len(entries) - resumed) / seconds, 3) if seconds > 0 else 0.0,
        "backends": {name: dict(stats) for name, stats in sorted(requests.stats.items())},
        "stopped": stopped,
    }
    with open(paths["report"], "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
    return CaptionReport(data)


def merge_caption_parts(parts: list[str], output: str) -> CaptionReport:
    """Joins the outputs of ``kangaroo curate caption --shard K/N`` (every K of one N, each run to
    its end over the same manifest and settings) into ``output``: the lines in manifest order,
    the reasons, and one report whose counts are the parts' sums."""
    if not output.endswith(".jsonl"):
        raise ValueError(f"--output must be a .jsonl file, got {output}")
    found = []
    for part in parts:
        paths = output_paths(os.path.abspath(part))
        try:
            with open(paths["report"], encoding="utf-8") as handle:
                report = json.load(handle)
            with open(paths["progress"], encoding="utf-8") as handle:
                header = json.loads(handle.readline())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{part} is not the output of a finished `kangaroo curate caption --shard` run: {err}")
        if report.get("stopped") or report.get("done") != report.get("lines"):
            raise ValueError(f"{part} did not finish ({report.get('done')} of {report.get('lines')} lines); "
                             "run its command again first")
        if not header.get("shard"):
            raise ValueError(f"{part} was not run with --shard")
        found.append((tuple(header["shard"]), header, paths, report))
    found = [(shard, paths, report, header) for shard, header, paths, report in check_shards(found)]
    paths = output_paths(os.path.abspath(output))
    if any(os.path.abspath(paths["manifest"]) == f[1]["manifest"] for f in found):
        raise ValueError(f"--output {output} is one of the parts")
    os.makedirs(os.path.dirname(paths["manifest"]), exist_ok=True)
    out_dir = os.path.dirname(paths["manifest"])
    with open(paths["manifest"], "w", encoding="utf-8") as out:
        for _, part_paths, _, _ in found:
            part_dir = os.path.dirname(part_paths["manifest"])
            with open(part_paths["manifest"], encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    for key in ("video", "image"):  # relative to the part: made relative to the output
                        value = record.get(key)
                        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
                            record[key] = os.path.relpath(os.path.join(part_dir, value), out_dir)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(paths["reasons"], "w", encoding="utf-8") as out:
        for _, part_paths, _, _ in found:
            with open(part_paths["reasons"], encoding="utf-8") as handle:
                out.writelines(handle)
    reports = [f[2] for f in found]
    data: dict[str, Any] = {"manifest": reports[0]["manifest"], "output": output, "shard": None,
                            "parts": [f[1]["manifest"] for f in found], "stopped": None}
    for key in ("lines", "done", "captioned", "failed", "skipped", "resumed", "requests", "retries", "prompt_tokens",
                "completion_tokens"):
        data[key] = sum(r[key] for r in reports)
    for key in ("failures", "skips"):
        data[key] = dict(sum((collections.Counter(r[key]) for r in reports), collections.Counter()))
    backends: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for report in reports:
        for name, stats in report["backends"].items():
            backends[name].update(stats)
    data["backends"] = {name: dict(stats) for name, stats in sorted(backends.items())}
    data["seconds"] = round(max(r["seconds"] for r in reports), 3)  # the parts ran side by side
    data["requests_per_s"] = round(data["requests"] / data["seconds"], 3) if data["seconds"] > 0 else 0.0
    data["lines_per_s"] = round((data["done"] - data["resumed"]) / data["seconds"], 3) if data["seconds"] > 0 else 0.0
    with open(paths["report"], "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
    return CaptionReport(data)
