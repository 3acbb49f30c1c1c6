"""``kangaroo serve`` under load: C concurrent clients (the official ``openai`` client) x R
requests each, a video question with a ``data:`` URL each; prints requests/s, p50/p95 latency,
answers lost, and the server's resident memory before and after two rounds of that load.

    python benchmarks/serve_load.py [--model DIR] [--clients 16] [--requests 4] [--max-tokens 16]

Without ``--model`` it serves a folder of the tiny model (random weights) it writes itself. The
server decodes one request at a time: the latency of a request is mostly its wait in the queue.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    import httpx
    import openai

    from benchmarks.generation import tiny_folder
    from kangaroo.data.video import write_video

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        folder = args.model or tiny_folder(root, 112, 128, 4)
        clip = os.path.join(root, "clip.mp4")
        write_video(clip, (np.random.default_rng(0).random((16, 96, 128, 3)) * 255).astype(np.uint8), fps=4)
        url = "data:video/mp4;base64," + base64.b64encode(open(clip, "rb").read()).decode()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "serve", "--model", folder, "--port", str(port),
                                   "--served-model-name", "m", "--log-level", "warning"])
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                     {"type": "text", "text": "What happens in this video?"}]}]
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
            client.chat.completions.create(model="m", messages=messages, max_tokens=args.max_tokens)  # warm-up
            before = rss_mb(server.pid)
            latencies: list[float] = []
            failures: list[str] = []

            def run_client() -> None:
                own = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
                for _ in range(args.requests):
                    started = time.perf_counter()
                    try:
                        own.chat.completions.create(model="m", messages=messages, max_tokens=args.max_tokens)
                        latencies.append(time.perf_counter() - started)
                    except Exception as err:  # counted and printed below
                        failures.append(repr(err))

            rounds = []
            for _ in range(2):  # the first round grows the server's pools; a second shows whether it keeps growing
                latencies.clear()
                started = time.perf_counter()
                threads = [threading.Thread(target=run_client) for _ in range(args.clients)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                rounds.append((time.perf_counter() - started, rss_mb(server.pid)))
            wall, after = rounds[-1]
        finally:
            server.terminate()
            server.wait(timeout=30)
    total = args.clients * args.requests
    ordered = sorted(latencies)
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}: "
          f"{len(latencies)}/{total} answered, {len(failures)} failed{': ' + failures[0] if failures else ''}")
    print(f"throughput: {len(latencies) / wall:.2f} requests/s over {wall:.1f} s")
    print(f"latency p50 {statistics.median(ordered):.2f} s, p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} s")
    print(f"server resident memory: {before:.0f} MB after one request, {rounds[0][1]:.0f} MB after a first round "
          f"of load, {after:.0f} MB after a second (figures above: the second round)")


if __name__ == "__main__":
    main()
