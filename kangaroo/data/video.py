"""Reading frames and their presentation timestamps from video files with PyAV."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import av
import numpy as np


FrameTransform = Callable[[np.ndarray], np.ndarray]
"""A function of one decoded ``(H, W, 3)`` uint8 frame, applied as it is decoded."""


class MediaError(Exception):
    """A media file that cannot be used; the message is the reject reason."""


@dataclass
class FrameSampling:
    """Which frames of a video become model input (paper §IV-B).

    Each strategy picks target instants; the kept frames are the stream's frames nearest to them.
    """

    strategy: Literal["uniform", "dynamic", "fps"] = "uniform"
    """``uniform``: ``num_frames`` instants evenly spread over the video; ``dynamic``: one per
    ``seconds_per_frame`` of video, the count clamped to ``[min_frames, max_frames]``, evenly
    spread; ``fps``: a resample at ``fps`` frames per second (4 in the paper), spread evenly
    over at most ``max_frames`` when longer."""
    num_frames: int = 8
    min_frames: int = 16
    max_frames: int = 64
    seconds_per_frame: float = 2.0
    fps: float = 4.0
    multiple_of: int = 1
    """The frame count is rounded down to a multiple of this (2 when patchify merges frame pairs)."""
    min_duration: float = 0.0
    """Videos shorter than this many seconds are rejected (5 s for instruction data)."""

    def __post_init__(self) -> None:
        if self.strategy not in ("uniform", "dynamic", "fps"):
            raise ValueError(f"sampling.strategy must be uniform, dynamic or fps, got {self.strategy!r}")
        if min(self.num_frames, self.min_frames, self.max_frames, self.multiple_of) < 1:
            raise ValueError(f"sampling frame counts must be positive, got {self}")
        if self.min_frames > self.max_frames:
            raise ValueError(f"sampling.min_frames={self.min_frames} exceeds max_frames={self.max_frames}")
        if self.fps <= 0 or self.seconds_per_frame <= 0:
            raise ValueError(f"sampling.fps and seconds_per_frame must be positive, got {self}")

    def frame_count(self, duration: float) -> int:
        """Frames to take from a video of ``duration`` seconds."""
        if self.strategy == "uniform":
            n = self.num_frames
        elif self.strategy == "dynamic":
            n = min(max(math.ceil(duration / self.seconds_per_frame), self.min_frames), self.max_frames)
        else:
            n = min(max(math.floor(duration * self.fps), 1), self.max_frames)
        return max(n - n % self.multiple_of, self.multiple_of)

    def target_times(self, duration: float) -> list[float]:
        """The instants, in seconds, whose nearest frames are kept."""
        n = self.frame_count(duration)
        if self.strategy == "fps" and math.floor(duration * self.fps) <= self.max_frames:
            return [k / self.fps for k in range(n)]
        return [(i + 0.5) * duration / n for i in range(n)]


@dataclass
class VideoClip:
    frames: np.ndarray
    """``(n, H, W, 3)`` uint8 RGB."""
    timestamps: np.ndarray
    """``(n,)`` float32 presentation times in seconds from the stream start."""
    duration: float
    """Seconds."""


def select_frames(times: list[float], duration: float, sampling: FrameSampling) -> list[int]:
    """Indices into ``times`` (sorted presentation times in seconds) of the frames nearest to the
    sampling's target instants. A video with fewer frames than asked for repeats frames."""
    array = np.asarray(times)
    return [int(np.abs(array - t).argmin()) for t in sampling.target_times(duration)]


def read_video(path: str, sampling: FrameSampling, transform: FrameTransform | None = None) -> VideoClip:
    """Decodes the sampled frames of ``path``'s first video stream.

    Timestamps are the frames' own presentation times (``pts x time_base`` minus the stream
    start), so variable frame rate videos keep their real timing. ``transform`` is applied to
    each frame as it is decoded (``kangaroo.data.transforms.FrameScaler``: the clip is held at the
    model's resolution, not the file's). Raises ``MediaError``.
    """
    index = index_video(path)
    if index.duration < sampling.min_duration:
        raise MediaError(f"video is {index.duration:.2f} s long, shorter than the minimum {sampling.min_duration} s")
    chosen = select_frames(index.times, index.duration, sampling)
    return VideoClip(decode_frames(path, index, chosen, transform),
                     np.asarray([index.times[i] for i in chosen], dtype=np.float32), index.duration)


@dataclass
class VideoIndex:
    """Every frame's presentation time, read from the packets without decoding."""

    pts: list[int]
    times: list[float]
    """Seconds from the stream start, sorted."""
    duration: float
    """Seconds: the last frame's time plus one mean frame interval."""


def index_video(path: str) -> VideoIndex:
    """Raises ``MediaError`` for a missing, unreadable or frameless file."""
    pts, time_base, start = _frame_pts(path)
    times = [float((p - start) * time_base) for p in pts]
    interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    return VideoIndex(pts, times, times[-1] + interval)


def decode_frames(path: str, index: VideoIndex, chosen: list[int], transform: FrameTransform | None = None) -> np.ndarray:
    """``(len(chosen), H, W, 3)`` uint8 RGB frames at positions ``chosen`` of ``index``, each
    through ``transform`` as it is decoded."""
    decoded = _decode_pts(path, {index.pts[i] for i in chosen}, transform)
    missing = [index.pts[i] for i in chosen if index.pts[i] not in decoded]
    if missing:
        raise MediaError(f"could not decode {len(missing)} of the sampled frames (truncated or corrupt video)")
    return np.stack([decoded[index.pts[i]] for i in chosen])


def _frame_pts(path: str) -> tuple[list[int], object, int]:
    """Sorted presentation timestamps of every video packet, read without decoding."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError("file has no video stream")
            stream = container.streams.video[0]
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
            time_base = stream.time_base
            start = stream.start_time if stream.start_time is not None else (pts[0] if pts else 0)
    except FileNotFoundError as err:
        raise MediaError(f"missing file: {path}") from err
    except av.FFmpegError as err:
        raise MediaError(f"unreadable video: {err}") from err
    if not pts or time_base is None:
        raise MediaError("video has no frames")
    return pts, time_base, start


def _decode_pts(path: str, wanted: set[int], transform: FrameTransform | None = None) -> dict[int, np.ndarray]:
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                if frame.pts in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    found[frame.pts] = transform(rgb) if transform is not None else rgb
                    if len(found) == len(wanted):
                        break
    except av.FFmpegError as err:
        if not found:
            raise MediaError(f"unreadable video: {err}") from err
    return found


def write_video(
    path: str,
    frames: np.ndarray,
    fps: float | str = 25,
    times: list[float] | None = None,
    codec: str = "libx264",
) -> None:
    """Writes ``(n, H, W, 3)`` uint8 frames. ``fps`` may be a fraction string (``"30000/1001"``);
    ``times`` (seconds, increasing) gives each frame its own presentation time for variable
    frame rate output. The container follows the extension (mp4, webm, mkv)."""
    from fractions import Fraction

    rate = Fraction(fps) if isinstance(fps, str) else Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), stream.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
