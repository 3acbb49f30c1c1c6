"""Per-GPU memory plan of each 8B stage under FSDP2, from the model's real parameter counts.

Builds every ``configs/kangaroo-8b`` stage's model on the meta device (exact parameter counts
per part, nothing allocated; LoRA adapters included), reads its trainable parts, sequence
length, rows per step and frame counts, and adds up what one GPU holds at the peak of a
training step on ``devices`` GPUs with the config's strategy (FSDP2, fp32 master weights, bf16
compute, activation checkpointing per block):

- sharded state: fp32 parameters of every part, fp32 gradients and AdamW's two fp32 moments of
  the trainable ones, each divided over the GPUs;
- gathered units: the root unit (LLM embeddings, final norm, output head) stays gathered in
  bf16 through the step; two decoder layers are gathered at a time (the one running and the one
  prefetched); a trainable unit also holds its unsharded bf16 gradient and the fp32 copy that is
  reduce-scattered;
- activations, counted per token from the tensors each block saves for its backward (listed in
  ``llm_values_per_token`` and ``vit_values_per_token``), in bf16: with checkpointing, every
  block keeps its input and one block at a time is recomputed whole; a frozen tower keeps nothing
  and peaks at one block's forward;
- the loss: one chunk of ``loss_chunk_size`` labelled rows of fp32 logits and their gradient;
- LoRA adapters (``lora_bytes_per_token``): their parameters, gradients and moments count with the
  trainable ones, a unit's unsharded gradients only for what trains in it, and each adapted
  layer also saves its dropped-out input and the dropout mask, and the rank-``r`` output of its
  down projection, for the backward.

It is an estimate of tensor memory: the CUDA context, NCCL buffers and allocator fragmentation
come on top (keep 10 GB of an 80 GB GPU free for them). The figures without checkpointing and
without sharding are printed beside, to show what each buys.

Run: python benchmarks/memory_plan.py [--gpu-gb 80] [--output docs/memory.md]
"""

from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass

import torch

GB = 1e9
BF16, FP32 = 2, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llm_values_per_token(hidden: int, intermediate: int, heads: int, kv_heads: int) -> float:
    """Values a Llama decoder layer saves per token for its backward: the two RMSNorm inputs
    (upcast to fp32 inside: 2 values each), the q/k/v projection input, q, k and v after RoPE
    (k and v at kv_heads/heads width), the attention output (flash/efficient SDPA saves it, no
    score matrix), the MLP input, gate and up outputs, SiLU(gate) and the down projection input."""
    kv = hidden * kv_heads / heads
    return 2 * hidden + hidden + (hidden + 2 * kv) + hidden + 2 * hidden + hidden + 4 * intermediate


def vit_values_per_token(width: int, mlp: int) -> float:
    """Values an EVA02 block saves per token: norm1 input, q/k/v input, q, k, v, attention output,
    its inner norm input and the projection input, norm2 input, the SwiGLU input, both fc1 outputs,
    SiLU, the inner norm input and the fc2 input."""
    return 9 * width + 5 * mlp


def vit_forward_peak_per_token(width: int, mlp: int) -> float:
    """A frozen block's transient peak per token: its input and output and the SwiGLU hidden."""
    return 2 * width + 3 * mlp


def lora_bytes_per_token(block: torch.nn.Module) -> float:
    """Bytes an adapted block saves per token for its adapters' backward: per LoRA layer the
    dropout's output (bf16) and its mask (1 byte) where dropout is on, and the rank-r output of
    ``lora_A`` (bf16). Zero for a block without adapters."""
    from peft.tuners.lora import LoraLayer

    total = 0.0
    for module in block.modules():
        if isinstance(module, LoraLayer):
            for name, down in module.lora_A.items():
                dropped = not isinstance(module.lora_dropout[name], torch.nn.Identity)
                total += (down.in_features * (BF16 + 1) if dropped else 0) + down.out_features * BF16
    return total


@dataclass
class Stage:
    name: str
    devices: int
    rows: int
    tokens: int
    frames_per_row: int
    vit_tokens_per_frame: int
    parts: dict[str, int]
    trainable: dict[str, int]
    root_params: int
    layer_params: int
    layers: int
    vit_blocks: int
    vit_block_params: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vit_width: int
    vit_mlp: int
    vocab: int
    loss_chunk: int
    ac_llm: bool
    ac_vit: bool
    image_size: int
    attention: str
    head_dim: int
    max_positions: int
    rope: str
    root_trainable: int
    layer_trainable: int
    vit_block_trainable: int
    llm_lora_bytes: float
    vit_lora_bytes: float


def load_stage(path: str) -> Stage:
    import yaml

    from kangaroo.modules.language_model import position_limit
    from kangaroo.training.stage_file import load_stage_file

    with open(path) as handle:  # the trainer section: the GPUs and the strategy's checkpointing
        trainer = yaml.safe_load(handle)["trainer"]
    devices = int(trainer["devices"])
    ac = (trainer.get("strategy") or {}).get("init_args", {}).get("activation_checkpointing", {})
    ac = dict.fromkeys(("vision_tower", "language_model"), ac) if isinstance(ac, bool) else ac
    sections = load_stage_file(path)
    stage, data = sections["model"], sections["data"]
    stage.load_pretrained, stage.init_from = False, None
    with torch.device("meta"):
        stage.configure_model()
    model = stage.model
    parts = {name: sum(p.numel() for p in part.parameters()) if part is not None else 0
             for name, part in model.parts().items()}
    trainable = {name: sum(p.numel() for p in part.parameters() if p.requires_grad) if part is not None else 0
                 for name, part in model.parts().items()}
    llm = model.language_model
    cfg = llm.config
    layer = llm.model.layers[0]
    block = model.vision_tower.trunk.blocks[0]
    root = sum(p.numel() for n, p in llm.named_parameters() if ".layers." not in n)
    sampling = data.prepare.sampling
    if data.hparams.packing:  # a packed row is filled with frames up to its token budget
        frames = data.hparams.max_tokens // model.tokens_per_frame
    else:  # one sample per row (stage 1: one image, uniform(1))
        frames = sampling.num_frames if sampling.strategy == "uniform" else sampling.max_frames
    grid = model.vision_tower.grid
    return Stage(
        name=os.path.splitext(os.path.basename(path))[0], devices=devices, rows=data.hparams.rows_per_batch,
        tokens=data.hparams.max_tokens, frames_per_row=frames,
        vit_tokens_per_frame=grid[0] * grid[1] + model.vision_tower.trunk.num_prefix_tokens,
        parts=parts, trainable=trainable, root_params=root, layer_params=sum(p.numel() for p in layer.parameters()),
        layers=cfg.num_hidden_layers, vit_blocks=len(model.vision_tower.trunk.blocks),
        vit_block_params=sum(p.numel() for p in block.parameters()), hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        vit_width=model.vision_tower.width, vit_mlp=block.mlp.fc2.in_features, vocab=cfg.vocab_size,
        loss_chunk=model.loss_chunk_size, ac_llm=bool(ac.get("language_model")), ac_vit=bool(ac.get("vision_tower")),
        image_size=model.vision_tower.image_size, attention=stage.architecture.language_model.attn_implementation,
        head_dim=cfg.hidden_size // cfg.num_attention_heads, max_positions=position_limit(cfg)[0],
        rope=position_limit(cfg)[1],
        root_trainable=sum(p.numel() for n, p in llm.named_parameters() if ".layers." not in n and p.requires_grad),
        layer_trainable=sum(p.numel() for p in layer.parameters() if p.requires_grad),
        vit_block_trainable=sum(p.numel() for p in block.parameters() if p.requires_grad),
        llm_lora_bytes=lora_bytes_per_token(layer), vit_lora_bytes=lora_bytes_per_token(block))


def attention_memory(s: Stage, dense: bool) -> float:
    """What the attention path holds besides the activations counted per token. flash-attn's
    varlen kernel (what ``attn_implementation: auto`` runs on a GPU with flash-attn): the fp32
    log-sum-exp per head and token that the recomputed layer keeps for its backward, and the
    sample boundaries. ``sdpa`` (the fallback): the dense S x S boolean mask per row that
    transformers derives from the restarting positions, and the bf16 bias the kernel takes
    it as, per layer call."""
    if dense:
        return s.rows * s.tokens * s.tokens * (1 + BF16)
    return FP32 * s.heads * s.rows * s.tokens


def plan(s: Stage, checkpointing: bool = True, sharded: bool = True, dense: bool = False) -> dict[str, float]:
    n = s.devices if sharded else 1
    total = sum(s.parts.values())
    trained = sum(s.trainable.values())
    llm_trained = s.trainable["language_model"] > 0
    vit_trained = s.trainable["vision_tower"] > 0
    rows = {
        "parameters (fp32, sharded)": FP32 * total / n,
        "gradients (fp32, sharded)": FP32 * trained / n,
        "AdamW moments (2 x fp32, sharded)": 2 * FP32 * trained / n,
    }
    if sharded:
        gathered = BF16 * (s.root_params + 2 * s.layer_params + 2 * s.vit_block_params)
        # unsharded bf16 gradients plus their fp32 copy for the reduce-scatter, of what trains in a unit
        gathered += (BF16 + FP32) * (s.root_trainable + 2 * s.layer_trainable + 2 * s.vit_block_trainable)
        rows["gathered units (bf16 weights, unsharded grads)"] = gathered
    llm_tokens = s.rows * s.tokens
    per_layer = (BF16 * llm_values_per_token(s.hidden, s.intermediate, s.heads, s.kv_heads) + s.llm_lora_bytes) \
        * llm_tokens
    if checkpointing and s.ac_llm:
        llm_act = s.layers * BF16 * s.hidden * llm_tokens + per_layer
    else:
        llm_act = s.layers * per_layer
    rows["LLM activations"] = llm_act
    vit_tokens = s.rows * s.frames_per_row * s.vit_tokens_per_frame
    if not vit_trained:
        vit_act = BF16 * vit_forward_peak_per_token(s.vit_width, s.vit_mlp) * vit_tokens
    else:
        per_block = (BF16 * vit_values_per_token(s.vit_width, s.vit_mlp) + s.vit_lora_bytes) * vit_tokens
        vit_act = (s.vit_blocks * BF16 * s.vit_width * vit_tokens + per_block) if (checkpointing and s.ac_vit) \
            else s.vit_blocks * per_block
    rows["vision tower activations"] = vit_act
    rows["loss chunk (fp32 logits and their gradient)"] = 2 * FP32 * s.loss_chunk * s.vocab
    rows["attention: mask or kernel state"] = attention_memory(s, dense or s.attention not in ("auto", "flash_attention_2"))
    # uint8 from the loader, fp32 once the model normalises them, and the bf16 copy the tower computes on
    rows["pixel tensors (uint8 input, fp32 normalised, bf16 copy)"] = \
        (1 + FP32 + BF16) * s.rows * s.frames_per_row * 3 * s.image_size ** 2
    # the cos/sin tables of the LLM's RoPE over the row (the scaled RoPE of stages 4-5 is no larger)
    rows["RoPE cos/sin (fp32)"] = 2 * FP32 * s.rows * s.tokens * s.head_dim
    rows["total"] = sum(rows.values())
    return rows


def render(stages: list[Stage], gpu_gb: float) -> str:
    lines = [
        "# Memory plan: the 8B curriculum on 8 x 80 GB GPUs, LoRA stages 4 and 5 on one",
        "",
        "Written by `python benchmarks/memory_plan.py --output docs/memory.md` from the parameter counts of",
        "the models the `configs/kangaroo-8b` stage files build (on the meta device, LoRA adapters included),",
        "their trainable parts, sequence lengths, rows per step and frame counts, under the configs'",
        "strategy: FSDP2 over their GPUs (8; 1 for the LoRA forms of stages 4 and 5), fp32 master",
        "weights, bf16 compute, fp32 gradient reduction, activation checkpointing per",
        "block. The method and every per-token count are in the script's docstrings. Figures are tensor",
        "memory per GPU in GB (1e9 bytes) at the peak of a step; the CUDA context, NCCL buffers and",
        "allocator fragmentation come on top: keep about 10 GB of each 80 GB free for them.",
        "",
    ]
    header = "| per GPU, GB | " + " | ".join(s.name for s in stages) + " |"
    lines += [header, "|---|" + "---:|" * len(stages)]
    shapes = [
        ("GPUs", lambda s: str(s.devices)),
        ("LLM tokens per step", lambda s: f"{s.rows} x {s.tokens}"),
        ("frames per row (ViT tokens per frame)", lambda s: f"{s.frames_per_row} ({s.vit_tokens_per_frame})"),
        ("trainable parameters", lambda s: f"{sum(s.trainable.values()) / 1e9:.2f} B of {sum(s.parts.values()) / 1e9:.2f} B"),
        ("activation checkpointing (ViT, LLM)", lambda s: f"{'on' if s.ac_vit else 'off'}, {'on' if s.ac_llm else 'off'}"),
        ("attention", lambda s: "flash-attn varlen" if s.attention in ("auto", "flash_attention_2") else s.attention),
        ("LLM positions (RoPE)", lambda s: f"{s.max_positions} ({s.rope})"),
    ]
    for label, value in shapes:
        lines.append(f"| {label} | " + " | ".join(value(s) for s in stages) + " |")
    plans = [plan(s) for s in stages]
    for key in plans[0]:
        cells = [f"**{p[key] / GB:.1f}**" if key == "total" else f"{p[key] / GB:.1f}" for p in plans]
        lines.append(f"| {'**total**' if key == 'total' else key} | " + " | ".join(cells) + " |")
    lines.append(f"| headroom on {gpu_gb:.0f} GB | " + " | ".join(f"{gpu_gb - p['total'] / GB:.1f}" for p in plans) + " |")
    lines += ["", "What the plan rests on:", ""]
    no_ac = [plan(s, checkpointing=False) for s in stages]
    no_shard = [plan(s, sharded=False) for s in stages]
    lines.append("| without ..., GB per GPU | " + " | ".join(s.name for s in stages) + " |")
    lines.append("|---|" + "---:|" * len(stages))
    lines.append("| activation checkpointing (total) | " + " | ".join(f"{p['total'] / GB:.0f}" for p in no_ac) + " |")
    lines.append("| sharding: every GPU holds the whole state (total) | "
                 + " | ".join(f"{p['total'] / GB:.0f}" for p in no_shard) + " |")
    dense = [plan(s, dense=True) for s in stages]
    lines.append("| flash-attn: sdpa's dense mask instead (total; the portable fallback) | "
                 + " | ".join(f"{p['total'] / GB:.1f}" for p in dense) + " |")
    lines += [
        "",
        "- Stage 5 fits 22K tokens because the decoder layers keep only their 4096-wide inputs",
        "  (32 x 22,528 x 4096 x 2 bytes) and recompute one layer at a time, and because the loss never",
        "  materialises the 22,528 x 128,256 logits (`labelled_token_loss`: one chunk of 1,024 rows).",
        "- The frozen ViT of stage 5 saves nothing for a backward pass; its peak is one block's forward",
        "  over every frame of the row.",
        "- The `-lora` stages fit one GPU because only the adapters (168 M parameters at r 64 on every",
        "  linear layer of the LLM), patchify and projector have gradients and AdamW moments; the fp32",
        "  master weights of the whole model (33 GB) are the largest item. Their activations are the full",
        "  stages' plus what the adapters save (their dropped-out inputs and dropout masks).",
        "- The preference stage's row holds a pair's two replies within the same 22,528 tokens. Its",
        "  reference pass (the model with its adapters off, no gradient) saves nothing for a backward",
        "  pass; its peak is one layer's forward over the row, below the training pass counted here.",
        "- `attn_implementation: auto` (the 8B language model) runs flash-attn's varlen kernel where it",
        "  is installed (`pip install 'kangaroo[gpu]'`): attention memory and work follow the samples of",
        "  a row. Without it the stage falls back to sdpa with the dense mask (the last line above).",
        "- Rows of stages 4 and 5 pass Llama-3's 8,192 positions: those stages state Llama-3.1-style RoPE",
        "  scaling to 32,768 positions (`language_model_overrides`), which changes no tensor's size.",
        "- Host memory at start-up (stages 2-5 start from `init_from`): each process builds the vision",
        "  tower and the LLM without parameter memory, shards them and reads the file tensor by tensor",
        "  (`FSDP2Strategy.init_on_meta`): about 33 GB / 8 of fp32 shards per process plus one whole",
        "  tensor (the 2.1 GB embedding table) at a time, where building whole and reading the file",
        "  whole took about 33 + 33 GB per process (`benchmarks/startup_memory.py` measures it). That",
        "  holds for a local safetensors file, which is what a stage hands the next; an `s3://` file or",
        "  a sharded checkpoint folder as `init_from` is still read whole into every process. Stage 1",
        "  reads the pre-trained Llama and EVA02 with their libraries' loaders, whole in every process.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--output", help="also write the plan to this markdown file")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "kangaroo-8b", "[1-9]-*.yaml")))
    stages = [load_stage(p) for p in paths]
    text = render(stages, args.gpu_gb)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
