"""``kangaroo curate caption`` against real servers on 127.0.0.1: lines/s at several concurrencies.

    python benchmarks/caption_throughput.py [--captioner-model DIR] [--summariser-model DIR]
                                            [--lines 24] [--concurrency 1 8] [--max-tokens 16]

The frame captioner is ``kangaroo serve`` (continuous batching: concurrent requests share decode
steps), the summariser ``transformers serve`` (transformers' own server, run without its
``--continuous-batching``). Each video line asks 5 frame captions and 1 summary. Without
``--captioner-model`` / ``--summariser-model`` it writes tiny random-weight models itself (each
reply then runs to ``--max-tokens``). Prints, per concurrency, lines/s, requests/s and the ratio
to the first one listed (1 by default); then each server alone, 16 requests one at a time and 8 at once, which says
whether it batches concurrent requests (ratio above 1) or queues them (about 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[:3]} ended with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def word_corpus() -> list[str]:
    """Enough distinct words for the tiny tokenizer's BPE to fill its vocabulary: with a small
    corpus most ids are filler special tokens, which a random-weight model then emits and the
    server strips, leaving empty replies."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    return [" ".join(words[i:i + 40]) for i in range(0, len(words), 40)]


def summariser_folder(root: str) -> str:
    """A tiny random-weight Llama with the tiny tokenizer and its chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kangaroo.world.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(word_corpus())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    folder = os.path.join(root, "summariser")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def clips(root: str, count: int) -> str:
    import numpy as np

    from kangaroo.data.video import write_video

    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        path = os.path.join(root, f"clip-{i}.mp4")
        write_video(path, rng.integers(0, 255, size=(16, 96, 128, 3), dtype=np.uint8), fps=8)
        lines.append({"id": f"clip-{i}", "video": path})
    manifest = os.path.join(root, "clips.jsonl")
    with open(manifest, "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return manifest


def alone(backend: dict, max_tokens: int, manifest: str, count: int = 16) -> tuple[float, float]:
    """Requests/s of one server asked ``count`` requests one at a time, then 8 at once: the
    ratio says whether it batches concurrent requests (above 1) or queues them (about 1)."""
    import base64
    import concurrent.futures as futures

    import openai

    from kangaroo.curate.captions import FrameSelection, pick_frames

    client = openai.OpenAI(base_url=backend["base_url"], api_key="EMPTY", max_retries=0, timeout=300)
    with open(manifest) as handle:
        video = json.loads(handle.readline())["video"]
    _, frame = pick_frames(video, FrameSelection(count=1), "x", 0)[0]
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(frame).decode()}}
    text = "Below are captions of 5 frames taken in order from one video: a red screen, then a blue one."
    content = [image, {"type": "text", "text": "Describe this video frame."}] if "kangaroo" in backend["name"] else text

    def ask(_) -> None:
        client.chat.completions.create(model=backend["model"], messages=[{"role": "user", "content": content}],
                                       max_tokens=max_tokens, temperature=0)

    rates = []
    for workers in (1, 8):
        started = time.perf_counter()
        with futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(ask, range(count)))
        rates.append(count / (time.perf_counter() - started))
    return rates[0], rates[1]


def main() -> None:
    from benchmarks.generation import tiny_folder
    from kangaroo.curate.captions import caption_config, caption_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captioner-model")
    parser.add_argument("--summariser-model")
    parser.add_argument("--lines", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        captioner = args.captioner_model or tiny_folder(root, 112, 128, 4, corpus=word_corpus())
        summariser = args.summariser_model or summariser_folder(root)
        manifest = clips(root, args.lines)
        ports = free_port(), free_port()
        logs = [open(os.path.join(root, name), "w") for name in ("kangaroo-serve.log", "transformers-serve.log")]
        servers = [
            subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "serve", "--model", captioner, "--port",
                              str(ports[0]), "--served-model-name", "captioner", "--log-level", "warning"],
                             stdout=logs[0], stderr=subprocess.STDOUT),
            subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", summariser,
                              "--device", "cpu", "--host", "127.0.0.1", "--port", str(ports[1])],
                             stdout=logs[1], stderr=subprocess.STDOUT),
        ]
        try:
            wait_up(f"http://127.0.0.1:{ports[0]}/v1/models", servers[0])
            wait_up(f"http://127.0.0.1:{ports[1]}/health", servers[1])
            backends = {
                "captioners": [{"name": "kangaroo-serve", "base_url": f"http://127.0.0.1:{ports[0]}/v1",
                                "model": "captioner", "max_tokens": args.max_tokens}],
                "summarisers": [{"name": "transformers-serve", "base_url": f"http://127.0.0.1:{ports[1]}/v1",
                                 "model": summariser, "max_tokens": args.max_tokens}]}
            # one warm-up line per server, not counted
            warm = caption_config({**backends, "concurrency": 1})
            with open(manifest) as handle:
                first = handle.readline()
            with open(os.path.join(root, "warm.jsonl"), "w") as handle:
                handle.write(first)
            caption_manifest(os.path.join(root, "warm.jsonl"), os.path.join(root, "warm-out.jsonl"), warm,
                             progress=False)
            print(f"{args.lines} video lines, 6 requests each (5 frames, 1 summary), max_tokens {args.max_tokens}")
            print(f"{'concurrency':>12}{'lines/s':>10}{'requests/s':>12}{'x first':>8}{'captioned':>11}")
            base = None  # lines/s at the first concurrency listed (1 by default)
            for concurrency in args.concurrency:
                config = caption_config({**backends, "concurrency": concurrency})
                report = caption_manifest(manifest, os.path.join(root, f"out-{concurrency}.jsonl"), config,
                                          progress=False).data
                base = base or report["lines_per_s"]
                print(f"{concurrency:>12}{report['lines_per_s']:>10.2f}{report['requests_per_s']:>12.2f}"
                      f"{report['lines_per_s'] / base:>8.2f}{report['captioned']:>11}"
                      + (f"   failed: {report['failures']}" if report["failed"] else ""))
            print("each server alone, 16 requests of max_tokens each: one at a time, then 8 at once")
            print(f"{'server':>20}{'serial req/s':>14}{'8 at once req/s':>17}{'x':>7}")
            for backend in (backends["captioners"][0], backends["summarisers"][0]):
                serial, parallel = alone(backend, args.max_tokens, manifest)
                print(f"{backend['name']:>20}{serial:>14.2f}{parallel:>17.2f}{parallel / serial:>7.2f}")
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
            for log in logs:
                log.close()


if __name__ == "__main__":
    main()
