import numpy as np
import pytest

from conftest import random_video
from kangaroo.data.video import FrameSampling, MediaError, _frame_pts, read_video, select_frames


def stream_times(path):
    pts, time_base, start = _frame_pts(path)
    return [float((p - start) * time_base) for p in pts]


@pytest.mark.parametrize("fps, step", [(25, 1 / 25), ("30000/1001", 1001 / 30000)])
def test_timestamps_are_stream_presentation_times_at_constant_rate(tmp_path, fps, step):
    path = random_video(tmp_path / "clip.mp4", frames=30, fps=fps)
    clip = read_video(path, FrameSampling("uniform", num_frames=6))
    times = stream_times(path)
    np.testing.assert_allclose(times, np.arange(30) * step, atol=1e-6)
    assert all(any(abs(t - s) < 1e-6 for s in times) for t in clip.timestamps)
    assert clip.frames.shape == (6, 48, 64, 3) and clip.duration == pytest.approx(30 * step)


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_variable_frame_rate_keeps_each_frame_time(tmp_path, name):
    written = [0.0, 0.04, 0.09, 0.3, 0.31, 0.8, 0.85, 1.5, 1.52, 2.4, 2.45, 2.5]
    path = random_video(tmp_path / name, frames=len(written), times=written)
    np.testing.assert_allclose(stream_times(path), written, atol=1e-3)
    clip = read_video(path, FrameSampling("fps", fps=4.0, max_frames=64))
    for t in clip.timestamps:
        assert min(abs(t - w) for w in written) < 1e-3


@pytest.mark.parametrize("name, codec", [("c.webm", "libvpx-vp9"), ("c.mkv", "mpeg4"), ("c.mp4", "h264")])
def test_codecs_and_containers(tmp_path, name, codec):
    clip = read_video(random_video(tmp_path / name, frames=10, fps=10, codec=codec), FrameSampling(num_frames=4))
    assert clip.frames.shape == (4, 48, 64, 3)
    assert list(clip.timestamps) == sorted(clip.timestamps)


def test_decoded_pixels_are_the_written_frame(tmp_path):
    frames = np.zeros((6, 32, 32, 3), np.uint8)
    for i in range(6):
        frames[i, :, :, i % 3] = 40 * i + 30
    from kangaroo.data.video import write_video

    write_video(str(tmp_path / "c.mp4"), frames, fps=2)
    clip = read_video(str(tmp_path / "c.mp4"), FrameSampling("fps", fps=2.0))
    assert len(clip.frames) == 6
    for i in range(6):
        assert np.abs(clip.frames[i].astype(int) - frames[i]).mean() < 8  # lossy codec, same frame


def test_sampling_strategies():
    times = [i / 25 for i in range(25 * 40)]  # 40 s at 25 fps
    uniform = select_frames(times, 40.0, FrameSampling("uniform", num_frames=8))
    assert len(uniform) == 8 and np.allclose(np.diff([times[i] for i in uniform]), 5.0)
    dynamic = FrameSampling("dynamic", min_frames=16, max_frames=64, seconds_per_frame=2.0, multiple_of=2)
    assert dynamic.frame_count(40.0) == 20 and dynamic.frame_count(5.0) == 16 and dynamic.frame_count(1000) == 64
    fps = select_frames(times, 40.0, FrameSampling("fps", fps=4.0, max_frames=1000))
    assert len(fps) == 160 and times[fps[1]] == pytest.approx(0.24)
    assert FrameSampling("uniform", num_frames=7, multiple_of=2).frame_count(10) == 6


def test_short_video_repeats_frames(tmp_path):
    clip = read_video(random_video(tmp_path / "short.mp4", frames=3, fps=10), FrameSampling(num_frames=8))
    assert clip.frames.shape[0] == 8 and len(set(clip.timestamps.tolist())) == 3


def test_min_duration(tmp_path):
    with pytest.raises(MediaError, match="shorter than the minimum 5"):
        read_video(random_video(tmp_path / "c.mp4", frames=10, fps=10), FrameSampling(min_duration=5.0))


@pytest.mark.parametrize("content, reason", [(None, "missing file"), (b"", "unreadable video"),
                                             (b"\x00" * 4096, "unreadable video")])
def test_unusable_files(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MediaError, match=reason):
        read_video(str(path), FrameSampling())


def test_truncated_video(tmp_path):
    path = random_video(tmp_path / "c.mp4", frames=60, fps=10, size=(64, 64))
    data = open(path, "rb").read()
    with open(path, "wb") as out:
        out.write(data[: len(data) // 3])
    with pytest.raises(MediaError):
        read_video(path, FrameSampling(num_frames=8))


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="strategy"):
        FrameSampling("random")
    with pytest.raises(ValueError, match="min_frames=64 exceeds max_frames=16"):
        FrameSampling(min_frames=64, max_frames=16)
