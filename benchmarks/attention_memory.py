"""Peak memory and time of the attention path over one packed row, per attention implementation.

One row of ``--tokens`` (22,528 by default: stage 5's budget) packs ``--samples`` samples of
unequal length, positions restarting at 0 for each, as the collate writes them. A one-layer
Llama of small width runs forward and backward over it (the training step's attention work)
with each implementation available here; each runs in its own process, so that its peak
(``torch.cuda.max_memory_allocated`` on a GPU, the resident set's growth on a CPU) is its own.
On a CPU the step is the forward only, for every implementation: flex attention has no CPU
backward in torch 2.14 (it trains on GPUs only).

- ``sdpa``: transformers derives the block-diagonal mask from the restarting positions: a dense
  S x S boolean mask, and dense attention work (the portable fallback);
- ``flex_attention``: a block mask of the same documents (compiled on first use; its cost
  follows the samples, not the row);
- ``flash_attention_2`` (GPU, ``pip install 'kangaroo[gpu]'``): the varlen kernel over the
  sample boundaries (what ``attn_implementation: auto`` picks where it is installed);
- ``eager`` only with ``--eager``: it holds S x S scores per head (8 GB at the default size).

Run: python benchmarks/attention_memory.py [--tokens 22528] [--samples 9] [--eager]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.abspath(__file__)


def sample_lengths(tokens: int, samples: int) -> list[int]:
    """Unequal lengths (1 : 2 : ... : n, scaled) that fill the row exactly."""
    weights = list(range(1, samples + 1))
    lengths = [tokens * w // sum(weights) for w in weights]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=32768)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=args.implementation).to(device, dtype)
    lengths = sample_lengths(args.tokens, args.samples)
    ids = torch.randint(1, 1000, (1, args.tokens), device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    backward = cuda and not args.forward_only
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(backward)

    def step() -> None:
        with torch.set_grad_enabled(backward):
            hidden = model.model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
            if backward:
                hidden.float().square().mean().backward()

    step()  # compiles (flex attention), warms up kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_gb()
    started = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.repeats
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:  # ru_maxrss covers the warm-up too: the growth over the resident set before the timed steps
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    return {"implementation": args.implementation, "device": device.type, "peak_gb": peak, "seconds": seconds,
            "step": "forward + backward" if backward else "forward"}


def available(eager: bool) -> list[str]:
    names = ["sdpa", "flex_attention"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    if eager:
        names.append("eager")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=22528)
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="on a GPU too")
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.implementation:
        print(json.dumps(measure(args)))
        return
    lengths = sample_lengths(args.tokens, args.samples)
    print(f"one row of {args.tokens} tokens, {args.samples} samples ({min(lengths)}..{max(lengths)} tokens), "
          f"1 Llama layer of width {args.hidden}")
    results = []
    for name in available(args.eager):
        command = [sys.executable, HERE, "--implementation", name, "--tokens", str(args.tokens),
                   "--samples", str(args.samples), "--hidden", str(args.hidden), "--repeats", str(args.repeats),
                   *(["--forward-only"] if args.forward_only else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-1500:]}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    dense = next((r for r in results if r["implementation"] == "sdpa"), None)
    print("\n| implementation | device | step | peak memory of the step | vs dense-mask sdpa | time per step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        share = f"{r['peak_gb'] / dense['peak_gb']:.0%}" if dense and dense["peak_gb"] > 0 else "-"
        print(f"| {r['implementation']} | {r['device']} | {r['step']} | {r['peak_gb']:.2f} GB | {share} | "
              f"{r['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
