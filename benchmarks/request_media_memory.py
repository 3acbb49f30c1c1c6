"""Peak memory of one request's frames: decoded at full size then resized (the path before
frames were resized as they are decoded) against resized as decoded (``FrameScaler``, what
``prepare``, ``chat``, ``serve`` and ``eval`` do now).

    python benchmarks/request_media_memory.py [--size 448] [--frames 64 160] [--budget-gb 8]

For each resolution (480p, 1080p, 4K) it writes a 160-frame H.264 clip, then in a fresh process
per measurement decodes ``--frames`` frames and turns them into the model's ``(n, 3, s, s)``
uint8 pixels, and prints the process's peak resident memory above its resident memory before the
decode. The full-size path is not run where its arithmetic (the frames as uint8 twice, once in
the decoder's dict and once stacked, plus the float32 copy that is resized) is over
``--budget-gb``: its estimate is printed instead, since running it would exhaust this machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESOLUTIONS = {"480p": (480, 854), "1080p": (1080, 1920), "4K": (2160, 3840)}
CLIP_FRAMES = 160


def write_clip(path: str, height: int, width: int, frames: int = CLIP_FRAMES) -> None:
    """A moving gradient, frame by frame (a 4K clip never sits in memory whole)."""
    import av
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            rgb = np.stack([(xs + 4 * i) % 256, (ys + 2 * i) % 256, np.full_like(xs, (7 * i) % 256)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def measure(path: str, frames: int, size: int, at_decode: bool) -> None:
    """Run in a child: prints the peak resident memory above the start, in MB."""
    from kangaroo.data.transforms import FrameScaler, fit_frames
    from kangaroo.data.video import FrameSampling, read_video

    sampling = FrameSampling("uniform", num_frames=frames)
    read_video(path, FrameSampling("uniform", num_frames=2), FrameScaler(size))  # warm the decoder
    before = rss_mb()
    transform = FrameScaler(size) if at_decode else None
    pixels = fit_frames(read_video(path, sampling, transform).frames, size)
    assert pixels.shape == (frames, 3, size, size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(f"{max(0.0, peak - before):.0f}")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=448, help="the model's resolution (448: the 8B's stages 3-5)")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--budget-gb", type=float, default=8.0, help="largest full-size path run (default 8)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, frames, size, at_decode = args.child
        measure(path, int(frames), int(size), at_decode == "1")
        return

    print(f"peak memory of one request's frames above the process's start, MB (model resolution {args.size} px)")
    print(f"{'video':>6} {'frames':>6} {'decoded full size':>18} {'resized as decoded':>19} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="kangaroo-media-memory-") as scratch:
        for name in args.resolutions:
            height, width = RESOLUTIONS[name]
            path = os.path.join(scratch, f"{name}.mp4")
            write_clip(path, height, width)
            for frames in args.frames:
                results = {}
                estimate_gb = frames * height * width * 3 * (1 + 1 + 4) / 2**30
                for at_decode in (False, True):
                    if not at_decode and estimate_gb > args.budget_gb:
                        results[at_decode] = None
                        continue
                    child = subprocess.run([sys.executable, __file__, "--child", path, str(frames), str(args.size),
                                            "1" if at_decode else "0"], capture_output=True, text=True, check=True)
                    results[at_decode] = float(child.stdout.strip().splitlines()[-1])
                full, small = results[False], results[True]
                full_text = f"{full:.0f}" if full is not None else f"~{estimate_gb * 1024:.0f} (not run)"
                ratio = f"{full / max(small, 1):.0f}x" if full is not None else "-"
                print(f"{name:>6} {frames:>6} {full_text:>18} {small:>19.0f} {ratio:>6}", flush=True)


if __name__ == "__main__":
    main()
