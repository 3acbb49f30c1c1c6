"""The curation filters of the paper (§III-B, §III-D), each one small class behind one interface.

A ``SampleFilter`` looks at one item (a manifest line and its local video) and returns a
``Verdict``: keep it, remove it with a reason, or (``SceneCut``) replace it with clips. A
``DatasetFilter`` (``CategoryBalance``) sees every item that survived the sample filters at
once. Scores go into the per-sample reasons file, so thresholds can be tuned from a run.

Thresholds are the project's defaults (the paper does not publish its own); each is a
constructor argument set in the curation YAML (``configs/curate.yaml``).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kangaroo.curate.detectors import CascadeFaceDetector, FaceDetector, RapidOCRTextDetector, TextDetector, union_coverage


class LineError(Exception):
    """One line's failure inside a sample filter; its message is the reason in the report (no
    exception type in front of it)."""


class StopCuration(Exception):
    """A failure of the run, not of one line (a model server gone past its retries): the run
    stops, every finished line kept in its journal, and a rerun continues."""


@dataclass
class Item:
    """One unit of curation: a manifest line, or a clip cut from one."""

    id: str
    record: dict[str, Any]
    """The manifest line, written out unchanged when kept (clips get their own ``video`` and
    ``meta.clip_of``)."""
    video: str | None = None
    """The local video file, when the line has a video."""
    line: int = 0
    """The manifest line it came from."""

    @property
    def category(self) -> str | None:
        meta = self.record.get("meta") if isinstance(self.record.get("meta"), dict) else {}
        value = meta.get("category", self.record.get("category"))
        return None if value is None else str(value)

    @property
    def caption(self) -> str | None:
        """The caption text: a ``caption`` field, else the assistant turns joined."""
        if isinstance(self.record.get("caption"), str):
            return self.record["caption"]
        turns = self.record.get("conversations")
        if isinstance(turns, list):
            texts = [t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "assistant"]
            texts = [t for t in texts if isinstance(t, str)]
            return "\n".join(texts) if texts else None
        return None


@dataclass
class Verdict:
    keep: bool
    score: float | None = None
    reason: str = ""
    items: list[Item] | None = None
    """What replaces the item when kept (clips); ``None``: the item itself."""
    counts: dict[str, int] = field(default_factory=dict)
    """Extra per-filter counters for the report (e.g. clips written)."""


class CurateFilter(ABC):
    """Shared by sample and dataset filters: a name for the report and its settings."""

    name: str = "filter"

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, for the report and the resume check."""
        out = {}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            out[key] = {"class": type(value).__name__, **settings_of(value)} if isinstance(
                value, (TextDetector, FaceDetector)) else value
        return out

    def limit_threads(self, threads: int) -> None:
        """Called in each pool worker so that workers do not fight over cores."""
        detector = getattr(self, "detector", None)
        if detector is not None and getattr(detector, "threads", None) == 0:
            detector.threads = threads


def settings_of(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


class SampleFilter(CurateFilter):
    def applies(self, item: Item) -> bool:
        """Items it does not apply to pass through unexamined (default: items with a video)."""
        return item.video is not None

    def setup(self, workspace: str) -> None:
        """``workspace``: a folder beside the output manifest for files a filter writes."""

    @abstractmethod
    def check(self, item: Item) -> Verdict: ...


class DatasetFilter(CurateFilter):
    @abstractmethod
    def select(self, items: list[Item]) -> tuple[list[Item], list[tuple[Item, str]], dict[str, Any]]:
        """``(kept, [(removed, reason)], details for the report)``; ``kept`` keeps input order."""


class CoverageFilter(SampleFilter):
    """The shared measure of the text and face filters: ``frames`` frames evenly spread over
    the video; per frame the union area of the detector's regions as a fraction of the frame
    (eq. 1); the video's score is the maximum over frames, removed above ``max_coverage``."""

    covers = "regions cover"
    """How the reason names what was found."""

    def __init__(self, max_coverage: float, frames: int, detector) -> None:
        self.max_coverage, self.frames, self.detector = max_coverage, frames, detector

    def check(self, item: Item) -> Verdict:
        from kangaroo.data.video import FrameSampling, read_video

        frames = read_video(item.video, FrameSampling(strategy="uniform", num_frames=self.frames)).frames
        score = max(union_coverage(self.detector(f), f.shape[0], f.shape[1]) for f in frames)
        if score > self.max_coverage:
            return Verdict(False, score, f"{self.covers} {score:.1%} of a frame, above {self.max_coverage:.1%}")
        return Verdict(True, score)


class TextCoverageFilter(CoverageFilter):
    """Removes videos whose text covers too much of a frame (paper §III-B 1, eq. 1).

    Args:
        max_coverage: removed when the score is above this.
        frames: frames examined (3 in the paper).
        detector: a ``TextDetector``; default ``RapidOCRTextDetector`` (PP-OCRv4 detection).
    """

    name, covers = "text", "text covers"

    def __init__(self, max_coverage: float = 0.1, frames: int = 3, detector: TextDetector | None = None) -> None:
        super().__init__(max_coverage, frames, detector or RapidOCRTextDetector())


class FaceCoverageFilter(CoverageFilter):
    """Removes videos dominated by faces, such as a speaker in front of the camera (§III-B 2).

    Args:
        max_coverage: removed when the score is above this.
        frames: frames examined (5 in the paper).
        detector: a ``FaceDetector``; default ``CascadeFaceDetector``.
    """

    name, covers = "face", "faces cover"

    def __init__(self, max_coverage: float = 0.1, frames: int = 5, detector: FaceDetector | None = None) -> None:
        super().__init__(max_coverage, frames, detector or CascadeFaceDetector())


class StaticSceneFilter(SampleFilter):
    """Removes close-to-static videos (§III-B 3): dense optical flow (Farneback, OpenCV)
    between consecutive frames resized to ``size`` x ``size``.

    The score is the mean flow magnitude in pixels per frame at that size, averaged over
    ``pairs`` pairs of consecutive frames spread evenly over the video. A video of one frame
    scores 0.

    Args:
        min_flow: removed when the score is below this.
        pairs: consecutive-frame pairs measured.
        size: the side frames are resized to (128 in the paper).
    """

    name = "static"

    def __init__(self, min_flow: float = 0.1, pairs: int = 4, size: int = 128) -> None:
        self.min_flow, self.pairs, self.size = min_flow, pairs, size

    def check(self, item: Item) -> Verdict:
        import cv2
        from PIL import Image

        from kangaroo.data.video import decode_frames, index_video

        index = index_video(item.video)
        count = len(index.pts)
        if count < 2:
            score = 0.0
        else:
            starts = sorted({min(int((k + 0.5) * (count - 1) / self.pairs), count - 2) for k in range(self.pairs)})
            chosen = sorted({i for s in starts for i in (s, s + 1)})
            frames = dict(zip(chosen, decode_frames(item.video, index, chosen)))
            small = {i: np.asarray(Image.fromarray(f).convert("L").resize((self.size, self.size), Image.BILINEAR))
                     for i, f in frames.items()}
            magnitudes = []
            for s in starts:
                flow = cv2.calcOpticalFlowFarneback(small[s], small[s + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
                magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
            score = float(np.mean(magnitudes))
        if score < self.min_flow:
            return Verdict(False, score, f"static: mean optical flow {score:.3f} px/frame at {self.size}x{self.size}, "
                                         f"below {self.min_flow}")
        return Verdict(True, score)


class SceneCut(SampleFilter):
    """Splits videos into clips at detected cuts (§III-B 4) with PySceneDetect's content
    detector on the PyAV backend, drops clips shorter than ``min_seconds`` and splits clips
    longer than ``max_seconds`` into equal parts no longer than it.

    A video that is one scene within the limits is kept as it is (no re-encoding). Otherwise
    its clips are re-encoded (H.264, the source's frame timing) into the workspace and each
    becomes its own item with id ``<id>-clip<k>``, the line's other fields and
    ``meta.clip_of = {"id", "start", "end"}`` (seconds in the source). A caption of the whole
    video then goes with every clip, so cut before captioning. A video with no clip long
    enough is removed. The score is the number of clips kept.

    Args:
        threshold: the content detector's threshold (PySceneDetect's default 27; lower finds
            more cuts).
        min_seconds: shorter clips are dropped.
        max_seconds: longer clips are split.
    """

    name = "scene_cut"

    def __init__(self, threshold: float = 27.0, min_seconds: float = 2.0, max_seconds: float = 60.0) -> None:
        if min_seconds <= 0 or max_seconds <= 0:
            raise ValueError(f"scene_cut needs positive min_seconds and max_seconds, got {min_seconds}, {max_seconds}")
        self.threshold, self.min_seconds, self.max_seconds = threshold, min_seconds, max_seconds
        self._workspace = "."

    def setup(self, workspace: str) -> None:
        self._workspace = workspace

    def spans(self, path: str) -> tuple[list[tuple[float, float]], int]:
        """``(clip spans in seconds, scenes detected)``."""
        from scenedetect import ContentDetector, SceneManager, open_video

        from kangaroo.data.video import MediaError, index_video

        index = index_video(path)
        try:
            # suppress_output: PySceneDetect otherwise hands FFmpeg's log back to the terminal,
            # and every later encoder prints its statistics
            video = open_video(path, backend="pyav", suppress_output=True)
            manager = SceneManager()
            manager.add_detector(ContentDetector(threshold=self.threshold))
            manager.detect_scenes(video)
            scenes = manager.get_scene_list()
        except Exception as err:  # PySceneDetect wraps decoder errors in several types
            raise MediaError(f"scene detection failed: {err}") from err
        cuts = [(s.seconds, e.seconds) for s, e in scenes] or [(0.0, index.duration)]
        spans = []
        for start, end in cuts:
            length = end - start
            if length < self.min_seconds:
                continue
            parts = math.ceil(length / self.max_seconds - 1e-9)
            spans += [(start + k * length / parts, start + (k + 1) * length / parts) for k in range(parts)]
        return spans, len(cuts)

    def check(self, item: Item) -> Verdict:
        spans, scenes = self.spans(item.video)
        if not spans:
            return Verdict(False, 0, f"no scene of at least {self.min_seconds} s ({scenes} scenes detected)",
                           counts={"scenes": scenes})
        if len(spans) == 1 and scenes == 1 and spans[0][0] == 0.0:
            return Verdict(True, 1, counts={"scenes": 1})
        safe = re.sub(r"[^\w.-]", "_", item.id)
        outputs = [os.path.join(self._workspace, f"{safe}-clip{k:03d}.mp4") for k in range(len(spans))]
        write_clips(item.video, spans, outputs)
        clips = []
        for k, ((start, end), path) in enumerate(zip(spans, outputs)):
            record = copy.deepcopy(item.record)
            record["id"] = f"{item.id}-clip{k:03d}"
            record["video"] = path
            meta = record["meta"] if isinstance(record.get("meta"), dict) else {}
            meta.update(clip_of={"id": item.id, "start": round(start, 3), "end": round(end, 3)},
                        duration=round(end - start, 3))
            record["meta"] = meta
            clips.append(Item(record["id"], record, path, item.line))
        return Verdict(True, len(clips), items=clips, counts={"scenes": scenes, "clips_written": len(clips)})


def write_clips(path: str, spans: list[tuple[float, float]], outputs: list[str]) -> None:
    """Re-encodes the frames of ``path`` inside each ``[start, end)`` span to its output file in
    one decoding pass, keeping every frame's own time (shifted to start at 0)."""
    from fractions import Fraction

    import av

    from kangaroo.data.video import MediaError

    os.makedirs(os.path.dirname(os.path.abspath(outputs[0])), exist_ok=True)
    containers, streams, counts = {}, {}, [0] * len(spans)
    try:
        with av.open(path) as source:
            stream = source.streams.video[0]
            origin = stream.start_time or 0
            rate = stream.average_rate or Fraction(25)
            width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
            for frame in source.decode(stream):
                if frame.pts is None:
                    continue
                t = float((frame.pts - origin) * stream.time_base)
                k = next((i for i, (s, e) in enumerate(spans) if s <= t < e), None)
                if k is None:
                    continue
                if k not in containers:
                    containers[k] = av.open(outputs[k] + ".part", mode="w", format="mp4")
                    out = containers[k].add_stream("libx264", rate=rate)
                    out.width, out.height, out.pix_fmt = width, height, "yuv420p"
                    out.time_base = out.codec_context.time_base = Fraction(1, 1000)
                    streams[k] = out
                image = frame.reformat(width=width, height=height, format="yuv420p")
                image.pts, image.time_base = round((t - spans[k][0]) * 1000), Fraction(1, 1000)
                for packet in streams[k].encode(image):
                    containers[k].mux(packet)
                counts[k] += 1
    except av.FFmpegError as err:
        raise MediaError(f"unreadable video while cutting: {err}") from err
    finally:
        for k, container in containers.items():
            for packet in streams[k].encode():
                container.mux(packet)
            container.close()
    empty = [k for k, n in enumerate(counts) if n == 0]
    if empty:
        raise MediaError(f"no frames decoded for clip {empty[0]} of {path}")
    for output in outputs:
        os.replace(output + ".part", output)


SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*|\n+")
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[\w']+")


def sentence_words(sentence: str) -> set[str]:
    """The word set of a sentence: jieba segmentation when it holds Chinese characters, else
    lower-cased words."""
    if CJK.search(sentence):
        import jieba

        jieba.setLogLevel(60)  # its dictionary-loading messages go to the log, not the terminal
        return {w.lower() for w in jieba.lcut(sentence) if WORD.fullmatch(w)}
    return {w.lower() for w in WORD.findall(sentence)}


def caption_repetition(caption: str) -> float:
    """The highest intersection-over-union of word sets over all sentence pairs of a caption
    (paper §III-D, eq. 2); 0 for a caption of one sentence."""
    sets = [words for part in SENTENCE_END.split(caption) if (words := sentence_words(part.strip()))]
    return max((len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)), default=0.0)


class CaptionRepetitionFilter(SampleFilter):
    """Removes captions whose sentences repeat each other (pre-training refinement, §III-D).

    Applies to lines with a ``caption`` or assistant turns; needs no video.

    Args:
        max_iou: removed when the highest sentence-pair IoU is above this.
    """

    name = "caption_repetition"

    def __init__(self, max_iou: float = 0.6) -> None:
        self.max_iou = max_iou

    def applies(self, item: Item) -> bool:
        return bool(item.caption)

    def check(self, item: Item) -> Verdict:
        score = caption_repetition(item.caption)
        if score > self.max_iou:
            return Verdict(False, score, f"repetitive caption: two sentences share {score:.0%} of their words "
                                         f"(IoU above {self.max_iou})")
        return Verdict(True, score)


class CategoryBalance(DatasetFilter):
    """Resamples every category above ``max_share`` of the data down to below it (§III-B 5).

    The category is the line's ``meta.category`` (or ``category``); lines without one are kept
    and count in the total. With counts ``c`` the filter finds the largest cap such that
    ``cap < max_share x sum(min(c, cap))`` and keeps a seeded random ``cap`` lines of each
    larger category; smaller categories are untouched. When no cap can work (fewer than
    ``1 / max_share`` categories), nothing is removed and the report says why.

    Args:
        max_share: the largest share a category may end with (0.01 in the paper).
        seed: the resampling seed.
    """

    name = "category_balance"

    def __init__(self, max_share: float = 0.01, seed: int = 0) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"category_balance.max_share must be in (0, 1], got {max_share}")
        self.max_share, self.seed = max_share, seed

    def cap(self, counts: list[int], uncategorised: int) -> int | None:
        """The largest per-category count that ends strictly below ``max_share``, or ``None``."""
        if not counts:
            return None
        low, high, best = 1, max(counts), None
        while low <= high:
            mid = (low + high) // 2
            if mid < self.max_share * (uncategorised + sum(min(c, mid) for c in counts)):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        return best

    def select(self, items):
        groups: dict[str, list[Item]] = {}
        for item in items:
            if item.category is not None:
                groups.setdefault(item.category, []).append(item)
        uncategorised = len(items) - sum(len(g) for g in groups.values())
        cap = self.cap([len(g) for g in groups.values()], uncategorised)
        details = {"categories": len(groups), "uncategorised": uncategorised, "cap": cap}
        if cap is None:
            details["note"] = (f"{len(groups)} categories cannot all end below {self.max_share:.2%}; "
                               "nothing resampled")
            return items, [], details
        if cap >= max((len(g) for g in groups.values()), default=0):
            return items, [], details
        dropped: set[int] = set()
        removed = []
        for name in sorted(groups):
            group = groups[name]
            if len(group) <= cap:
                continue
            rng = random.Random(f"{self.seed}:{name}")
            for item in rng.sample(group, len(group) - cap):
                dropped.add(id(item))
                removed.append((item, f"category balance: '{name}' had {len(group)} lines, resampled to {cap} "
                                      f"(below {self.max_share:.2%} of the kept data)"))
        details["resampled"] = {n: [len(g), cap] for n, g in sorted(groups.items()) if len(g) > cap}
        return [i for i in items if id(i) not in dropped], removed, details


def default_filters() -> list[CurateFilter]:
    """The defaults ``configs/curate.yaml`` spells out: cut first, then the cheap checks on each
    clip, the detectors, and the balance over what is left."""
    return [SceneCut(), StaticSceneFilter(), TextCoverageFilter(), FaceCoverageFilter(),
            CaptionRepetitionFilter(), CategoryBalance()]
