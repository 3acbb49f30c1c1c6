"""One short real training run that the inference, evaluation (and serving) tests share: a tiny
model learns to name the colour of a clip.

The world: clips of one solid colour with noise, each asked "What colour is the screen?" with the
options always in the same order, so the question's text says nothing and the answer needs the
pixels. The run goes the user's way: a stage file, ``prepare`` into LitData chunks, ``kangaroo
fit`` as a process (with validation, which logs ``val/accuracy``), then ``kangaroo export`` of
the stage folder. ``train_colour_model`` is called once per test session (see conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
QUESTION = "What colour is the screen?"
TRAIN, VAL = 96, 24
STEPS = 150


def _frame_prompt() -> str:
    from kangaroo.curate.captions import DEFAULT_MAX_WORDS, DEFAULT_PROMPTS

    return DEFAULT_PROMPTS["frame"]["en"].format(max_words=DEFAULT_MAX_WORDS["frame"])


FRAME_PROMPT = _frame_prompt()

STAGE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {steps}
  gradient_clip_val: 1.0
  log_every_n_steps: 10
  val_check_interval: {steps}
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
model:
  architecture:
    vision_tower: {{name: 'timm:eva02_tiny_patch14_224', image_size: 56, timm_kwargs: {{depth: 2, global_pool: token}}}}
    language_model:
      transformers_config: {{model_type: llama, vocab_size: 1024, hidden_size: 64, intermediate_size: 128,
                             num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
                             tie_word_embeddings: false}}
    visual_tokens: {{placeholder: 1019, vi_start: 1020, eof: 1021, eov: 1022, vi_end: 1023}}
    patchify: {{kernel: [2, 2, 2], init: uniform}}
  trainable: {{vision_tower: true, patchify: true, projector: true, language_model: true}}
  optimizer: {{lr: 3.0e-3, min_lr: 1.0e-4, warmup_steps: 10, weight_decay: 0.0, layer_decay: 1.0}}
data:
  train_dir: {data}/train
  val_dir: {data}/val
  max_tokens: 256
  packing: true
  rows_per_batch: 2
  num_workers: 0
  pad_id: 5
  prepare:
    tokenizer: {tokenizer}
    sampling: {{strategy: uniform, num_frames: 4, multiple_of: 2}}
    resize: pad
    max_tokens: 256
"""


@dataclass
class TrainedModel:
    folder: Path
    """The exported model folder."""
    stage_dir: Path
    stage_file: Path
    val_accuracy: float
    """``val/accuracy`` the stage logged on the held-out clips (teacher-forced first answer token)."""
    val_manifest: Path
    clips: dict[str, Path]
    """A held-out clip per colour."""


def colour_clip(path: Path, colour: str, seed: int, frames: int = 8) -> None:
    from kangaroo.data.video import write_video

    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.float32)
    pixels = base + rng.normal(0, 12, size=(frames, 32, 32, 3))
    write_video(str(path), pixels.clip(0, 255).astype(np.uint8), fps=4)


def frame_caption(colour: str) -> str:
    return f"A {colour} screen."


def colour_image(path: Path, colour: str, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, size=(32, 32, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def write_split(root: Path, split: str, count: int, offset: int) -> tuple[Path, dict[str, Path]]:
    """Training lines also teach the default frame-caption prompt of ``kangaroo curate caption``
    on single frames (images), so that the served model can be a frame captioner."""
    names = list(COLOURS)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines, clips = [], {}
    for i in range(count):
        colour = names[i % len(names)]
        clip = media / f"{split}-{i}.mp4"
        colour_clip(clip, colour, offset + i)
        clips.setdefault(colour, clip)
        lines.append({"id": f"{split}-{i}", "video": str(clip), "task": "mcq", "question": QUESTION,
                      "options": names, "answer": "ABCD"[names.index(colour)],
                      "meta": {"language": "en", "category": "colour"}})
        if split == "train":
            image = media / f"{split}-{i}.png"
            colour_image(image, colour, offset + i)
            lines.append({"id": f"{split}-{i}-frame", "image": str(image), "conversations": [
                {"role": "user", "content": FRAME_PROMPT}, {"role": "assistant", "content": frame_caption(colour)}]})
    manifest = root / f"{split}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, clips


def train_colour_model(root: Path) -> TrainedModel:
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    tokenizer = root / "tokenizer"
    corpus = [f"{QUESTION}\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter from the "
              "given choices directly. A B C D", FRAME_PROMPT, *map(frame_caption, COLOURS)] * 20
    build_tiny_tokenizer(corpus).save_pretrained(tokenizer)
    train_manifest, _ = write_split(root / "world", "train", TRAIN, 0)
    val_manifest, clips = write_split(root / "world", "val", VAL, 10_000)
    stage_dir, data = root / "stage", root / "data"
    stage_dir.mkdir()
    stage_file = stage_dir / "stage.yaml"  # where a recipe keeps a stage's file: export finds it there
    stage_file.write_text(STAGE.format(steps=STEPS, root=stage_dir, data=data, tokenizer=tokenizer))
    sections = load_stage_file(str(stage_file))
    layout = visual_layout(sections["model"].architecture)
    for manifest, split in ((train_manifest, "train"), (val_manifest, "val")):
        prepare_dataset(str(manifest), str(data / split), sections["data"].prepare, layout, strict=True)
    fit = subprocess.run([sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(stage_file)],
                         capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr[-3000:]
    metrics = json.loads((stage_dir / "stage-metrics.json").read_text())
    folder = root / "model"
    export = subprocess.run([sys.executable, "-m", "kangaroo.cli", "export", str(stage_dir), "--output", str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    return TrainedModel(folder, stage_dir, stage_file, float(metrics["eval_accuracy"]), val_manifest, clips)


def train_summariser(root: Path, steps: int = 200) -> Path:
    """A tiny text LLM (a Hugging Face Llama folder: weights, tokenizer, chat template) that has
    learned the default summary prompt of ``kangaroo curate caption`` on the colour world's frame
    captions: the summariser that ``transformers serve`` runs in the captioning tests."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kangaroo.curate.captions import DEFAULT_MAX_WORDS, DEFAULT_PROMPTS
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    rng = random.Random(0)

    def chat(colour: str) -> list[dict]:
        times = sorted(round(rng.uniform(0, 2), 2) for _ in range(5))
        listed = "\n".join(f"{i + 1}. ({t:g} s) {frame_caption(colour)}" for i, t in enumerate(times))
        prompt = DEFAULT_PROMPTS["summary"]["en"].format(captions=listed, count=5, max_words=DEFAULT_MAX_WORDS["summary"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"The video shows a {colour} screen."}]

    chats = [chat(colour) for _ in range(8) for colour in COLOURS]
    tokenizer = build_tiny_tokenizer([turn["content"] for c in chats for turn in c] * 4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    rows = []
    for c in chats:
        whole = tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(c[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = torch.tensor(whole)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        rows.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids, labels = rows[step % len(rows)]
        model(input_ids=ids[None], labels=labels[None]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = root / "summariser"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
