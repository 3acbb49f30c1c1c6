"""The tiny world's stand-ins for the 8B recipe's pre-trained models: a tiny Llama trained on the
world's conversations told in words, and a tiny EVA02 tower trained on freshly drawn frames."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np

from kangaroo.world.render import WorldConfig, random_frames, stable_seed

log = logging.getLogger(__name__)


def pretrain_llm(output: str, tokenizer, chats: list[list[dict]], config: WorldConfig,
                  held_out: list[tuple[list[dict], str]] = ()) -> dict[str, Any]:
    """The tiny recipe's stand-in for Llama-3-8B-Instruct: the tiny Llama trained on the world's
    conversations rendered through the chat template, each media told in words
    (``described_chats``). Stage 1 then starts, as the 8B recipe does, from a language model
    that knows the words, the chat format and how to answer from its prompt, but has never seen
    a pixel. Returns its first-answer-token accuracy on ``held_out`` (described held-out
    multiple-choice questions with their group), which ``world.json`` keeps."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from kangaroo.data.tokenization import ChatEncoder
    from kangaroo.modules.sizes import TINY_LLAMA, TINY_VISUAL_TOKENS

    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    encoder = ChatEncoder(tokenizer, TINY_VISUAL_TOKENS)
    pad = tokenizer.pad_token_id

    def batch_of(chats: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Whole conversations, padded: every answer is read with its whole prompt (a window cut
        # across conversations leaves answers without the words they answer from).
        encoded = [encoder.encode(chat) for chat in chats]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), pad)
        labels = torch.full((len(encoded), width), -100)
        for row, e in enumerate(encoded):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        return ids, labels

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, config.llm_steps)
    rng = random.Random(f"{config.seed}:llm")
    model.train()
    for _ in tqdm(range(config.llm_steps), desc="pre-training the tiny LLM", unit="step"):
        ids, labels = batch_of(rng.sample(chats, min(config.llm_batch, len(chats))))
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    model.eval()
    correct: dict[str, list[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(held_out), 64):
            part = held_out[start:start + 64]
            ids, labels = batch_of([chat for chat, _ in part])
            logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
            for row, (_, group) in enumerate(part):
                first = int((labels[row] != -100).nonzero()[0])
                correct.setdefault(group, []).append(bool(logits[row, first - 1].argmax() == labels[row, first]))
    report = {"final_loss": round(loss.item(), 4),
              "accuracy": {group: round(sum(hits) / len(hits), 3) for group, hits in sorted(correct.items())}}
    log.info("tiny LLM pre-trained on the world's chats: %s", report)
    model.save_pretrained(os.path.join(output, "llm"))
    return report


def _warmup_cosine(optimizer, steps: int):
    """The stages' schedule (a tenth of the steps warming up, cosine to 1% after)."""
    from functools import partial

    import torch

    from kangaroo.training.optim import warmup_cosine

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=steps // 10, total_steps=steps, min_ratio=0.01))


def _standardise_output(trunk, pixels) -> None:
    """Folds a per-channel standardisation of the patch tokens into the final LayerNorm, so that
    every channel (shape as much as colour) reaches the projector at the same scale and no
    shared offset dominates the tokens' norm."""
    tokens = trunk.forward_features(pixels)[:, trunk.num_prefix_tokens:].reshape(-1, trunk.embed_dim)
    mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-4)
    trunk.norm.weight.div_(std)
    trunk.norm.bias.sub_(mean).div_(std)


THIRDS = 3
"""The tiny ViT also tells which third of the frame, across and down, a shape is in."""
_HEADS = {"colour": slice(0, 5), "shape": slice(5, 10), "centre": slice(10, 12),
          "across": slice(12, 12 + THIRDS), "down": slice(12 + THIRDS, 12 + 2 * THIRDS)}
"""The outputs of the tiny ViT's pre-training heads (classes 4 of colour and shape: no shape)."""


def thirds(centres: np.ndarray) -> np.ndarray:
    """Which third of the frame, across and down, each centre ``(n, 2)`` in [0, 1] lies in."""
    return np.minimum((centres * THIRDS).astype(np.int64), THIRDS - 1)


def pretrain_vision(output: str, config: WorldConfig) -> dict[str, float]:
    """The tiny recipe's stand-in for the pre-trained EVA02-CLIP tower: the tiny ViT trained to
    tell each frame's colour, shape and position from every patch token (heads dropped after).
    Written as ``vision.safetensors`` in timm's own key names, which the stage configs load
    through ``vision_tower.pretrained``."""
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kangaroo.data.transforms import fit_frames, normalize

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(stable_seed(f"{config.seed}:vision"))
    size = config.vision_image_size
    # global_pool="token": a final LayerNorm on every token, as EVA02-CLIP's trunk has.
    trunk = timm.create_model(config.vision_model, img_size=size, num_classes=0, depth=config.vision_depth,
                              global_pool="token")
    heads = torch.nn.Linear(trunk.embed_dim, _HEADS["down"].stop)
    params = list(trunk.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    schedule = _warmup_cosine(optimizer, config.vision_steps)

    def per_token(frames: np.ndarray) -> torch.Tensor:
        return heads(trunk.forward_features(normalize(fit_frames(frames, size)))[:, trunk.num_prefix_tokens:])

    trunk.train()
    for _ in tqdm(range(config.vision_steps), desc="pre-training the tiny ViT", unit="step"):
        frames, classes, centres = random_frames(64, config.size, rng)
        # Every patch token answers for the whole frame, so that each visual token the LLM
        # later reads carries the frame's colour, shape and place on its own.
        out = per_token(frames)
        tokens = out.shape[1]
        shown = torch.from_numpy(classes[:, 1] < 4)
        colour, shape = (torch.from_numpy(classes[:, k]).repeat_interleave(tokens) for k in (0, 1))
        third = torch.from_numpy(thirds(centres[classes[:, 1] < 4])).repeat_interleave(tokens, 0)
        # Shape weighs double: the hardest of the three at this resolution. The third of the
        # frame a shape is in, as classes, makes place as plain in every token as colour is: the
        # LLM reads where a shape goes, and so which way it moves, as readily as its colour.
        loss = (F.cross_entropy(out[..., _HEADS["colour"]].reshape(-1, 5), colour)
                + 2 * F.cross_entropy(out[..., _HEADS["shape"]].reshape(-1, 5), shape)
                + 2 * F.mse_loss(out[shown][..., _HEADS["centre"]], torch.from_numpy(centres)[shown, None].expand(-1, tokens, -1))
                + 2 * sum(F.cross_entropy(out[shown][..., _HEADS[axis]].reshape(-1, THIRDS), third[:, k])
                          for k, axis in enumerate(("across", "down"))))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    trunk.eval()
    with torch.no_grad():  # how well single tokens tell the world apart, on fresh frames
        frames, classes, centres = random_frames(256, config.size, rng)
        shown = classes[:, 1] < 4
        out = per_token(frames).numpy()
        third = thirds(centres[shown])
        report = {"colour_accuracy": float((out[..., _HEADS["colour"]].argmax(-1) == classes[:, :1]).mean()),
                  "shape_accuracy": float((out[..., _HEADS["shape"]].argmax(-1) == classes[:, 1:2]).mean()),
                  "centre_error_px": float(np.abs(out[shown][..., _HEADS["centre"]] - centres[shown, None]).mean()
                                           * config.size),
                  "third_accuracy": float(np.mean([(out[shown][..., _HEADS[axis]].argmax(-1) == third[:, k, None]).mean()
                                                   for k, axis in enumerate(("across", "down"))]))}
        _standardise_output(trunk, normalize(fit_frames(frames, size)))
    log.info("tiny ViT pre-trained on the world's frames: %s", report)
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, os.path.join(output, "vision.safetensors"))
    return report
