"""Training throughput and model FLOPs utilisation of a 1B-scale Kangaroo on one GPU.

The model: an EVA02-L/14 tower at 448 px (timm's ``eva02_large_patch14_clip_224`` trunk, the
one inside open_clip's EVA02-L-14) with patchify, and a Llama-3.2-1B shaped LLM, random weights.
The batch: one packed 10,240-token row, as in stage 4 (two 32-frame clips, 4,096 visual tokens
each, and labelled answers filling the rest). Each step is forward, backward and AdamW, in bf16
autocast over fp32 weights, with activation checkpointing on both towers, timed after warm-up
with CUDA synchronisation. Printed per attention implementation (``sdpa``, ``flex_attention``,
and ``flash_attention_2`` where flash-attn is installed): step time, tokens/s (LLM tokens), model
TFLOP/s and MFU against the GPU's dense bf16 peak.

Model FLOPs count useful work only (no recomputation): 6 x parameters x tokens for every matmul
of both towers, the output head on labelled tokens only (what the loss computes), and
attention as 6 x layers x width x sum(s_i^2) in the LLM (causal, per packed sample) and
12 x blocks x width x tokens_per_frame^2 x frames in the ViT.

Without a GPU the script runs its CPU shape check: it builds the 1B model on the meta device and
checks the packed row's token layout, then runs the same step on the tiny model on the CPU and
checks the FLOP formula against ``torch.utils.flop_counter`` there, and says plainly that the GPU
figures are not measured.

Run: python benchmarks/gpu_throughput.py [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from model_step import packed_batch  # benchmarks/ is on the path when run as a script
from kangaroo.modules import KangarooConfig, LanguageModelConfig, PatchifyConfig, VisionTowerConfig, build_kangaroo
from kangaroo.modules.sizes import LLAMA3_VISUAL_TOKENS, kangaroo_tiny
from kangaroo.training.fsdp import apply_activation_checkpointing

LLAMA32_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True}
ROW_TOKENS, CLIPS, FRAMES = 10240, 2, 32
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
"""Dense bf16 peak by a name torch reports (``NVIDIA H100 80GB HBM3`` is the SXM part); first match wins."""


def config_1b(attention: str) -> KangarooConfig:
    return KangarooConfig(
        vision_tower=VisionTowerConfig("timm:eva02_large_patch14_clip_224", image_size=448),
        language_model=LanguageModelConfig(transformers_config=dict(LLAMA32_1B), attn_implementation=attention),
        visual_tokens=LLAMA3_VISUAL_TOKENS, patchify=PatchifyConfig())


def row_for(model, tokens: int, clips: int, frames: int) -> dict[str, torch.Tensor]:
    """``clips`` samples of ``frames`` frames whose answers fill the row to ``tokens`` exactly."""
    visual = len(model.placeholder_ids(frames)) + 3  # the layout and a 3-token prompt
    answer = (tokens - clips * visual) // clips
    batch = packed_batch(model, [frames] * clips, answer)
    pad = tokens - batch["input_ids"].shape[1]
    if pad:  # the remainder (fewer tokens than clips) as one more short text sample
        tail = torch.randint(1, 1000, (1, pad))
        batch["input_ids"] = torch.cat([batch["input_ids"], tail], 1)
        batch["labels"] = torch.cat([batch["labels"], tail], 1)
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad)[None]], 1)
    return batch


def model_flops(model, batch: dict[str, torch.Tensor]) -> float:
    """Useful FLOPs of one forward + backward (see the module docstring)."""
    llm = model.language_model
    cfg = llm.config
    body = sum(p.numel() for n, p in llm.named_parameters() if ".layers." in n)
    tokens = batch["input_ids"].numel()
    labelled = int((batch["labels"] != -100).sum())
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [tokens]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    flops = 6 * body * tokens + 6 * cfg.hidden_size * cfg.vocab_size * labelled
    flops += 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(s * s for s in lengths)
    trunk = model.vision_tower.trunk
    per_frame = model.vision_tower.tokens_per_frame + trunk.num_prefix_tokens
    frames = int(batch["frame_counts"].sum())
    blocks = sum(p.numel() for p in trunk.blocks.parameters())
    flops += 6 * blocks * per_frame * frames + 12 * len(trunk.blocks) * model.vision_tower.width * per_frame**2 * frames
    small = [model.projector] + ([model.patchify] if model.patchify is not None else [])
    visual = sum(model.num_visual_tokens(int(c)) for c in batch["frame_counts"])
    flops += 6 * sum(p.numel() for m in small for p in m.parameters()) * visual
    return float(flops)


def train_steps(model, batch, steps: int, warmup: int, device: torch.device, dtype: torch.dtype) -> list[float]:
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {loss.item()}")
    return times


def peak_tflops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16_TFLOPS if key in name), None)


def cpu_shape_check() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        big = build_kangaroo(config_1b("sdpa"))
    row = row_for(big, ROW_TOKENS, CLIPS, FRAMES)
    visual = int((row["input_ids"] == big.visual_tokens.placeholder).sum())
    assert row["input_ids"].shape == (1, ROW_TOKENS), row["input_ids"].shape
    assert visual == CLIPS * big.num_visual_tokens(FRAMES) == 8192, visual
    params = sum(p.numel() for p in big.parameters())
    print(f"1B-scale model built on meta: {params / 1e9:.2f} B parameters; packed row of {ROW_TOKENS} tokens, "
          f"{visual} visual ({CLIPS} clips x {FRAMES} frames at 448 px), {model_flops(big, row) / 1e12:.1f} TFLOP "
          "per training step (model FLOPs)")

    torch.manual_seed(0)
    tiny = kangaroo_tiny()
    batch = packed_batch(tiny, [8, 8], 64)
    counter = FlopCounterMode(display=False)
    with counter:
        tiny(**batch).loss.backward()
    counted, formula = counter.get_total_flops(), model_flops(tiny, batch)
    # The counter sees executed work: attention over the whole masked row, and the loss head run
    # again in its backward (chunk checkpointing); the formula counts useful work only.
    print(f"tiny model on the CPU: FLOP formula {formula / 1e9:.3f} GFLOP, torch.utils.flop_counter "
          f"{counted / 1e9:.3f} GFLOP executed ({formula / counted:.2f}x)")
    if not 0.85 < formula / counted < 1.15:
        raise SystemExit("the FLOP formula disagrees with torch's counter by more than 15%: MFU would be wrong")
    times = train_steps(tiny, batch, steps=2, warmup=1, device=torch.device("cpu"), dtype=torch.float32)
    print(f"tiny model trained 3 steps on the CPU ({sum(times) / len(times):.2f} s/step)")
    print("GPU figures (tokens/s, MFU): NOT MEASURED - no CUDA device here. Run this script on an H100 or H200.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_shape_check()
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    attentions = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    print(f"{name}, torch {torch.__version__}; bf16 peak {peak or 'unknown'} TFLOP/s; "
          f"flash-attn {'installed' if 'flash_attention_2' in attentions else 'not installed'}")
    for attention in attentions:
        torch.manual_seed(0)
        model = build_kangaroo(config_1b(attention))
        apply_activation_checkpointing(model, {"vision_tower": True, "language_model": True})
        batch = row_for(model, ROW_TOKENS, CLIPS, FRAMES)
        torch.cuda.reset_peak_memory_stats()
        times = train_steps(model, batch, args.steps, args.warmup, device, torch.bfloat16)
        step = sorted(times)[len(times) // 2]
        achieved = model_flops(model, batch) / step / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        print(f"{attention:<18} step {step:.3f} s  {ROW_TOKENS / step:,.0f} tokens/s  {achieved:.0f} TFLOP/s  "
              f"MFU {mfu}  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
