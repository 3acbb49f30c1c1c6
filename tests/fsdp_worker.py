"""A tiny stage fitted on fixed global batches, on 1 process or sharded over several (FSDP2).

Run by tests/test_parallel.py as a script (Lightning's launcher starts the other processes by
running this file again). Every step's global batch is the same whatever the number of
processes: two samples, packed into one row on 1 process, one row per process on 2. At steps 1
and 4 the second sample is text only, so on 2 processes rank 1 has no video while rank 0 has one.

With ``--media-mix`` the processes hold different numbers of media items in the same steps
instead (``MEDIA_MIX``: 0, 1 or 3 items, images and clips of 2 and 4 frames), which a sharded
part that ran once per media item would turn into mismatched collectives.

With ``--accumulate K`` every optimizer step's global batch is ``UNITS`` (four groups of samples
whose answers hold 1 to 40 tokens) split over processes and micro-batches: unit ``i`` goes to
rank ``i % devices``, micro-batch ``(i // devices) % K``; one process with ``K = 1`` holds all
four in one batch. ``OUT/grad_norms.json`` holds each step's gradient norm before clipping.

With ``--uneven`` every epoch holds ``UNEVEN`` micro-batches per process (see there), so that
epochs end on shares of different lengths, mid-window but for the empty micro-batches.

Writes ``OUT/losses.json`` (the stage's global-batch loss per step), ``OUT/media.rank{r}.json``
(steps at which the rank's batch held frames), ``OUT/media_counts.rank{r}.json`` (media items
per step) and ``OUT/model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import timedelta

import lightning as L
import torch

from kangaroo.modules.adapters import AdapterConfig
from kangaroo.modules import IGNORE_INDEX, KangarooConfig, LanguageModelConfig, PatchifyConfig, VisionTowerConfig
from kangaroo.training.optim import OptimizerConfig
from kangaroo.modules.sizes import TINY_VISUAL_TOKENS
from kangaroo.training.stage import KangarooStage

TEXT_ONLY = {(1, 1)}
"""(step, sample) pairs without media."""
IMAGE_SIZE, FRAMES = 28, 2
MEDIA_MIX = [([0], [2, 4, 1]), ([4], [0, 0]), ([2, 1, 2], [4])]
"""Per step (in turn): the frame counts of rank 0's samples and of rank 1's (0: text only, 1: an
image). One process holds all of them; rank totals of media items: 0/3, 1/0, 3/1."""


UNITS = [(1, 0), (40, 2), (2, 2), (20, 4)]
"""Per unit of an accumulation step: the answer's token count and the frame count (0: text only)."""


def architecture() -> KangarooConfig:
    return KangarooConfig(
        vision_tower=VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=IMAGE_SIZE,
                                       timm_kwargs={"depth": 2, "global_pool": "token"}),
        language_model=LanguageModelConfig(transformers_config={
            "model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}),
        visual_tokens=TINY_VISUAL_TOKENS,
        patchify=PatchifyConfig(kernel=(2, 2, 2)),
    )


def sample(step: int, index: int, placeholder_ids, frames: int | None = None, answer: int | None = None) -> dict:
    """Three global batches in turn, so that the loss falls within a few steps. ``frames``: the
    sample's frame count (0: text only); by default ``FRAMES``, or none at ``TEXT_ONLY``."""
    step = step % 3
    g = torch.Generator().manual_seed(1000 * step + index)
    length = answer if answer is not None else 3 + 4 * index + step % 3  # unequal counts per rank
    answer = torch.randint(1, 1000, (length,), generator=g).tolist()
    prompt = torch.randint(1, 1000, (4,), generator=g).tolist()
    if frames is None:
        frames = 0 if (step, index) in TEXT_ONLY else FRAMES
    if not frames:
        ids, pixels, times = prompt, None, None
    else:
        ids = prompt[:2] + placeholder_ids(frames) + prompt[2:]
        pixels = torch.randn(frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        times = 0.5 * step + 1.25 * torch.arange(frames, dtype=torch.float32)
    return {"ids": ids + answer, "labels": [IGNORE_INDEX] * len(ids) + answer, "pixels": pixels, "times": times}


def pack(samples: list[dict]) -> dict:
    with_media = [s for s in samples if s["pixels"] is not None]
    batch = {
        "input_ids": torch.tensor([sum((s["ids"] for s in samples), [])]),
        "labels": torch.tensor([sum((s["labels"] for s in samples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(s["ids"]))) for s in samples), [])]),
    }
    if with_media:
        batch.update(pixel_values=torch.cat([s["pixels"] for s in with_media]),
                     timestamps=torch.cat([s["times"] for s in with_media]),
                     frame_counts=torch.tensor([len(s["pixels"]) for s in with_media]))
    return batch


class FixedBatches(L.LightningDataModule):
    def __init__(self, steps: int, out: str, media_mix: bool = False, accumulate: int | None = None) -> None:
        super().__init__()
        self.steps, self.out, self.media_mix, self.accumulate = steps, out, media_mix, accumulate

    def micro_batches(self, step: int, layout, rank: int, world: int) -> list[dict]:
        """This rank's micro-batches of an accumulation step (see the module docstring)."""
        held: list[list[dict]] = [[] for _ in range(self.accumulate)]
        for i, (answer, frames) in enumerate(UNITS):
            if i % world == rank:
                held[(i // world) % self.accumulate].append(sample(step, i, layout, frames, answer))
        return [pack(samples) for samples in held]

    def samples(self, step: int, layout) -> list[list[dict]]:
        """The step's samples, grouped by the rank that holds them on 2 processes."""
        if not self.media_mix:
            return [[sample(step, i, layout)] for i in range(2)]
        groups, index = [], 0
        for counts in MEDIA_MIX[step % len(MEDIA_MIX)]:
            groups.append([sample(step, index + k, layout, frames) for k, frames in enumerate(counts)])
            index += len(counts)
        return groups

    def train_dataloader(self):
        trainer = self.trainer
        layout = trainer.lightning_module.model.placeholder_ids
        rank, world = trainer.global_rank, trainer.world_size
        batches = []
        for step in range(self.steps):
            if self.accumulate:
                batches.extend(self.micro_batches(step, layout, rank, world))
                continue
            groups = self.samples(step, layout)
            batches.append(pack(sum(groups, []) if world == 1 else groups[rank]))
        media = [step for step, b in enumerate(batches) if "pixel_values" in b]
        counts = [len(b["frame_counts"]) if "frame_counts" in b else 0 for b in batches]
        with open(os.path.join(self.out, f"media_counts.rank{rank}.json"), "w") as handle:
            json.dump(counts, handle)
        with open(os.path.join(self.out, f"media.rank{rank}.json"), "w") as handle:
            json.dump(media, handle)
        return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


UNEVEN = (7, 5)
"""With ``--uneven``: each process's micro-batches in every epoch (one sample each, answers of 1
to 9 tokens, some text only): on 2 processes with accumulation 4 the epoch's second window holds
process 0's last 3 and process 1's last one, topped up with empty micro-batches
(``kangaroo.data.even_epochs``). One process with accumulation 8 holds, in each window, the
micro-batches the two processes hold in theirs."""


class UnevenEpochs(L.LightningDataModule):
    def __init__(self, accumulate: int) -> None:
        super().__init__()
        self.accumulate = accumulate

    def train_dataloader(self):
        layout = self.trainer.lightning_module.model.placeholder_ids
        shares = [[pack([sample(m, 10 * r, layout, FRAMES if (m + r) % 3 else 0, 1 + (7 * m + 3 * r) % 9)])
                   for m in range(count)] for r, count in enumerate(UNEVEN)]
        if self.trainer.world_size > 1:
            return EvenEpochs(shares[self.trainer.global_rank], self.accumulate)
        per_process = self.accumulate // len(UNEVEN)
        windows = range(0, max(UNEVEN), per_process)
        return EvenEpochs([b for w in windows for share in shares for b in share[w:w + per_process]], 1)


class EvenEpochs:
    """A list of micro-batches as an epoch of ``kangaroo.data.even_epochs.even_epoch``."""

    def __init__(self, batches: list[dict], multiple_of: int) -> None:
        self.batches, self.multiple_of = batches, multiple_of

    def __iter__(self):
        from kangaroo.data.even_epochs import even_epoch

        return even_epoch(self.batches, self.multiple_of)


LORA = {"language_model": AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "vision_tower": AdapterConfig(r=2, alpha=4, target_modules=["proj"])}
"""With ``--lora``: adapters on both big parts, whose own weights then stay frozen."""


class RecordingStage(KangarooStage):
    """The stage, noting each step's gradient norm once the window's gradients are normalised."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for p in self.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1, help="machines (NODE_RANK or torchrun name this one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--param-dtype", default="auto", help="FSDP2 compute dtype (2 processes)")
    parser.add_argument("--media-mix", action="store_true", help="ranks hold 0, 1 or 3 media items per step")
    parser.add_argument("--accumulate", type=int, help="micro-batches per optimizer step over UNITS")
    parser.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2", help="on 2 processes")
    parser.add_argument("--uneven", action="store_true", help="epochs of UNEVEN micro-batches per process")
    parser.add_argument("--init-from", help="the stage's init_from (patchify a new part)")
    parser.add_argument("--init-on-meta", type=int, default=1, help="FSDP2Strategy.init_on_meta")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the frozen LLM and tower (LORA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    L.seed_everything(0)
    stage = RecordingStage(architecture(), trainable={"vision_tower": not args.lora, "patchify": True, "projector": True,
                                                     "language_model": not args.lora},
                          optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-4), init_from=args.init_from,
                          new_parts=["patchify"] if args.init_from else None, adapters=LORA if args.lora else None)
    strategy, processes = "auto", args.devices * args.num_nodes
    if processes > 1 and args.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=timedelta(seconds=120))
    elif processes > 1:
        from kangaroo.training.fsdp import FSDP2Strategy

        strategy = FSDP2Strategy(activation_checkpointing=True, param_dtype=args.param_dtype,
                                 timeout=timedelta(seconds=120),  # a hung collective fails, not hangs
                                 init_on_meta=bool(args.init_on_meta))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
                        max_steps=args.steps,
                        gradient_clip_val=0.5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=args.out, limit_val_batches=0, accumulate_grad_batches=args.accumulate or 1)
    data = (UnevenEpochs(args.accumulate or 1) if args.uneven
            else FixedBatches(args.steps, args.out, args.media_mix, args.accumulate))
    trainer.fit(stage, data)
    if trainer.is_global_zero:
        with open(os.path.join(args.out, "losses.json"), "w") as handle:
            json.dump([loss for _, loss in stage.loss_history], handle)
        with open(os.path.join(args.out, "grad_norms.json"), "w") as handle:
            json.dump(stage.grad_norms, handle)
    from kangaroo.distributed import exit_after_success

    exit_after_success()  # as `kangaroo fit` does: gloo left to the interpreter's teardown may abort


if __name__ == "__main__":
    main()
