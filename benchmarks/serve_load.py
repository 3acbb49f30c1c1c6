"""``kangaroo serve`` under load, with the official ``openai`` client.

    python benchmarks/serve_load.py [--model DIR] [--concurrency 1 4 8] [--requests 8] [--max-tokens 32]
                                    [--soak 60] [--soak-clients 8]

1. Rate: for each concurrency C, C clients send ``--requests`` greedy questions each (text and
   video questions of several wordings, video by ``data:`` URL); prints completions per second,
   the ratio to one client, and how many answers differ from the one each question gets alone
   (asked one at a time first).
2. Soak (``--soak S``): ``--soak-clients`` clients for S seconds, every 5th request with a broken
   video and every 7th asking for more tokens than the server allows; prints requests sent,
   answered, refused as expected, failed otherwise, the rows the server decoded (each answered
   request once: no request lost or answered twice) and the server's resident memory.

Without ``--model`` it serves a folder of the tiny model (random weights) it writes itself.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import socket
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


def questions(root: str) -> tuple[list[list[dict]], str]:
    """Several prompts (text, and video questions of 4 and 8 frames) and a broken video's URL."""
    from kangaroo.data.video import write_video

    urls = []
    for frames in (4, 8):
        path = os.path.join(root, f"clip{frames}.mp4")
        write_video(path, (np.random.default_rng(frames).random((frames, 96, 128, 3)) * 255).astype(np.uint8), fps=4)
        urls.append("data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode())
    broken = "data:video/mp4;base64," + base64.b64encode(b"\x00not a video" * 64).decode()

    def video(url: str, text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": text}]}]

    prompts = [[{"role": "user", "content": text}] for text in
               ("Hi", "What is a kangaroo?", "Describe a long afternoon by the river.", "Name three colours.")]
    prompts += [video(urls[0], "What happens in the video?"), video(urls[1], "What colour is the screen?"),
                video(urls[0], "Describe the scene."), video(urls[1], "How many objects move?")]
    return prompts, video(broken, "What?")


def main() -> None:
    import httpx
    import openai

    from benchmarks.generation import tiny_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cache-mb", default="1024", help="the server's prefix cache (default 1024; 0: off)")
    parser.add_argument("--text-only", action="store_true", help="only the text questions (no video decoding)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of the soak run (default: none)")
    parser.add_argument("--soak-clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        folder = args.model or tiny_folder(root, 112, 128, 4)
        prompts, broken = questions(root)
        if args.text_only:
            prompts = [p for p in prompts if isinstance(p[0]["content"], str)]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "serve", "--model", folder, "--port", str(port),
                                   "--served-model-name", "m", "--log-level", "warning",
                                   "--max-tokens", str(max(args.max_tokens, 64)), "--cache-mb", args.cache_mb])
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)

            def ask(own, messages, tokens=args.max_tokens) -> str:
                reply = own.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=tokens)
                return reply.choices[0].message.content

            alone = [ask(client, p) for p in prompts]  # also the warm-up
            rates = {}
            for clients in args.concurrency:
                answers: list[tuple[int, str]] = []
                failures: list[str] = []

                def run_client(index: int) -> None:
                    own = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
                    for r in range(args.requests):
                        which = (index * args.requests + r) % len(prompts)
                        try:
                            answers.append((which, ask(own, prompts[which])))
                        except Exception as err:  # counted and printed below
                            failures.append(repr(err))

                started = time.perf_counter()
                threads = [threading.Thread(target=run_client, args=(i,)) for i in range(clients)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - started
                rates[clients] = len(answers) / wall
                differ = sum(answer != alone[which] for which, answer in answers)
                print(f"{clients} concurrent clients x {args.requests} requests, max_tokens {args.max_tokens}: "
                      f"{rates[clients]:.2f} completions/s ({rates[clients] / rates[args.concurrency[0]]:.1f}x "
                      f"{args.concurrency[0]} client), {len(answers)}/{clients * args.requests} answered, "
                      f"{differ} differ from the one-at-a-time answer, {len(failures)} failed"
                      f"{': ' + failures[0] if failures else ''}", flush=True)
            print(f"server: {httpx.get(f'{base}/health', timeout=10).json()}")

            if args.soak:
                soak(base, args, prompts, broken, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)


def soak(base: str, args, prompts: list, broken: list, pid: int) -> None:
    import httpx
    import openai

    before = httpx.get(f"{base}/health", timeout=10).json()
    memory_before = rss_mb(pid)
    counts = {"sent": 0, "answered": 0, "refused as expected": 0, "failed otherwise": 0}
    lock = threading.Lock()
    numbers = itertools.count()
    stop_at = time.monotonic() + args.soak
    errors: list[str] = []

    def run_client() -> None:
        own = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        while time.monotonic() < stop_at:
            n = next(numbers)
            bad_media, too_long = n % 5 == 4, n % 7 == 6
            messages = broken if bad_media else prompts[n % len(prompts)]
            tokens = 10**6 if too_long else args.max_tokens
            with lock:
                counts["sent"] += 1
            try:
                own.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=tokens)
                key = "failed otherwise" if bad_media or too_long else "answered"
            except openai.BadRequestError as err:
                key = "refused as expected" if bad_media or too_long else "failed otherwise"
                if key == "failed otherwise":
                    errors.append(repr(err))
            except Exception as err:  # counted and printed below
                key = "failed otherwise"
                errors.append(repr(err))
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=run_client) for _ in range(args.soak_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.get(f"{base}/health", timeout=10).json()
    rows = after["rows"] - before["rows"]
    print(f"soak: {args.soak_clients} clients for {args.soak:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f"; the server decoded {rows} rows for {counts['answered']} answered requests "
          f"({'each once' if rows == counts['answered'] else 'MISMATCH'}), largest batch {after['largest_batch']}; "
          f"memory {memory_before:.0f} -> {rss_mb(pid):.0f} MB" + (f"; first error: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
