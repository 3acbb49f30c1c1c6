"""Preference tuning (DPO, kangaroo.training.preference): pairs read from the manifest and
prepared with both replies, collated side by side, each sample's log-probability, the DPO loss
against the reference (a frozen copy, or the model with its adapters off), and a short stage
from the shared trained model that learns held-out pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_video
from kangaroo.data.manifest import ManifestSample, Reject, read_manifest
from kangaroo.data.packing import collate_rows
from kangaroo.modules import kangaroo_tiny
from kangaroo.modules.layout import IGNORE_INDEX

FROZEN = {"vision_tower": False, "patchify": False, "projector": False, "language_model": False}


def test_a_pair_is_read_prepared_with_both_replies_and_collated_as_two_samples(tmp_path, tiny_tokenizer_dir):
    from kangaroo.data.encode import PrepareConfig, SampleEncoder
    from kangaroo.data.video import FrameSampling
    from kangaroo.modules.builder import visual_layout
    from kangaroo.modules.sizes import kangaroo_tiny_config

    random_video(tmp_path / "clip.mp4", frames=8, fps=4)
    lines = [
        {"id": "p1", "video": "clip.mp4", "prompt": "What colour is the shape?", "chosen": "The shape is red.",
         "rejected": "The shape is blue."},
        {"id": "p2", "video": "clip.mp4", "conversations": [{"role": "user", "content": "<video>\nWhich way?"}],
         "chosen": "It moves left.", "rejected": "It moves up."},
        {"id": "bad-1", "video": "clip.mp4", "prompt": "Which?", "chosen": "A ring."},
        {"id": "bad-2", "video": "clip.mp4", "prompt": "Which?", "chosen": "A ring.", "rejected": "A ring. "},
        {"id": "bad-3", "video": "clip.mp4", "conversations": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}],
         "chosen": "A ring.", "rejected": "A bar."},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    read = list(read_manifest(str(manifest)))
    assert [type(r) for r in read] == [ManifestSample, ManifestSample, Reject, Reject, Reject]
    assert "non-empty 'chosen' and 'rejected'" in read[2].reason and "are the same" in read[3].reason
    assert "end with the user's turn" in read[4].reason
    pair = read[0]
    assert pair.meta["task"] == "preference"
    assert pair.conversations[-1] == {"role": "assistant", "content": "The shape is red."}
    assert pair.rejected[:-1] == pair.conversations[:-1] and pair.rejected[-1]["content"] == "The shape is blue."

    config = kangaroo_tiny_config()
    layout = visual_layout(config)
    encoder = SampleEncoder(PrepareConfig(tokenizer=tiny_tokenizer_dir, sampling=FrameSampling("uniform", num_frames=4,
                                                                                               multiple_of=2)),
                            layout, str(tmp_path))
    records = [encoder.encode(sample) for sample in read[:2]]
    for record in records:
        record["pixels"] = torch.as_tensor(record["pixels"])  # raw frames, as the loader hands them on
        chosen, rejected = len(record["input_ids"]), len(record["rejected_input_ids"])
        assert record["num_tokens"] == chosen + rejected, "both replies count towards the budget"
        # the same prompt (media included, unlabelled), then the replies, labelled
        reply = int(np.argmax(np.asarray(record["labels"]) != IGNORE_INDEX))
        assert reply == int(np.argmax(np.asarray(record["rejected_labels"]) != IGNORE_INDEX)) > 4 * 16
        assert list(record["input_ids"][:reply]) == list(record["rejected_input_ids"][:reply])
        assert list(record["labels"][reply:]) != list(record["rejected_labels"][reply:])
    batch = collate_rows([records], pad_id=0)
    assert batch["pairs"] == 2 and batch["sample_ids"] == ["p1", "p2"] and batch["tasks"] == ["preference"] * 4
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1).tolist()
    lengths = [len(r[k]) for r in records for k in ("input_ids", "rejected_input_ids")]
    assert starts[:4] == [0, *np.cumsum(lengths)[:3].tolist()], "chosen then rejected, each from position 0"
    assert batch["frame_counts"].tolist() == [4, 4, 4, 4], "each reply sees the pair's media"


def pairs_batch(model, pairs: int = 3, seed: int = 0):
    """``pairs`` random pairs (a prompt with frames, two different labelled replies) in one row."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.visual_tokens.placeholder - 1
    size = model.vision_tower.image_size
    records = []
    for index in range(pairs):
        prompt = torch.randint(1, vocab, (3,), generator=g).tolist() + model.placeholder_ids(2)
        replies = [torch.randint(1, vocab, (2 + index,), generator=g).tolist() for _ in range(2)]
        ids = [prompt + reply for reply in replies]
        labels = [[IGNORE_INDEX] * len(prompt) + reply for reply in replies]
        records.append({"id": f"p{index}", "input_ids": ids[0], "labels": labels[0], "rejected_input_ids": ids[1],
                        "rejected_labels": labels[1], "num_tokens": len(ids[0]) + len(ids[1]),
                        "pixels": (torch.rand(2, 3, size, size, generator=g) * 255).to(torch.uint8),
                        "timestamps": [0.0, 1.0]})
    return collate_rows([records[:2], records[2:]], pad_id=0)  # two rows, the second padded


def test_sample_log_probabilities_are_each_samples_labelled_tokens_under_the_logits():
    torch.manual_seed(0)
    model = kangaroo_tiny().eval()
    batch = pairs_batch(model)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values", "timestamps", "frame_counts")}
    with torch.no_grad():
        output = model(**inputs, labels=batch["labels"], sample_logprobs=True, return_logits=True)
        plain = model(**inputs, labels=batch["labels"])
    logprobs = F.log_softmax(output.logits.float(), -1)
    expected, counts = [], []
    for row in range(batch["input_ids"].shape[0]):
        positions, labels = batch["position_ids"][row], batch["labels"][row]
        starts = (positions == 0).nonzero().squeeze(1).tolist() + [len(positions)]
        for begin, end in zip(starts, starts[1:]):
            targets = labels[begin + 1:end]
            picked = logprobs[row, begin:end - 1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            if (targets != IGNORE_INDEX).any():  # the padding run has no labels
                expected.append(picked[targets != IGNORE_INDEX].sum())
                counts.append(int((targets != IGNORE_INDEX).sum()))
    assert len(expected) == 6, "three pairs, two replies each; the padding is no sample"
    torch.testing.assert_close(output.sample_logprobs, torch.stack(expected), rtol=1e-5, atol=1e-4)
    assert output.sample_label_counts.tolist() == counts == [2, 2, 3, 3, 4, 4]
    torch.testing.assert_close(output.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)


def preference_stage(**kwargs):
    from kangaroo.modules.adapters import AdapterConfig
    from kangaroo.modules.sizes import kangaroo_tiny_config
    from kangaroo.training.preference import PreferenceConfig
    from kangaroo.training.stage import KangarooStage

    kwargs.setdefault("adapters", {"language_model": AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])})
    stage = KangarooStage(kangaroo_tiny_config(), kwargs.pop("trainable", FROZEN),
                          preference=PreferenceConfig(beta=0.5), **kwargs)
    torch.manual_seed(0)
    stage.configure_model()
    return stage


@pytest.mark.parametrize("lora", [True, False], ids=["adapters-off", "frozen-copy"])
def test_the_reference_is_the_starting_model_and_the_loss_starts_at_log_2(lora):
    """At the start the policy is the reference: every pair's margin is 0 and its loss log 2.
    Moved away (the adapters' B, or the LLM's weights), the policy changes and the reference does
    not: with adapters it is the model with them switched off, whose requires_grad flags come back."""
    from kangaroo.training.preference import pair_terms

    stage = preference_stage(**({} if lora else {"adapters": None, "trainable": {**FROZEN, "language_model": True}}))
    batch = pairs_batch(stage.model)
    terms, _ = stage._pairs(batch)
    torch.testing.assert_close(terms["loss"], torch.full((3,), float(np.log(2))), rtol=1e-5, atol=1e-5)
    reference = stage._reference_logprobs(batch)
    trains = {n: p.requires_grad for n, p in stage.model.named_parameters()}
    with torch.no_grad():
        for name, parameter in stage.model.named_parameters():
            if ("lora_B" in name) if lora else name.endswith("o_proj.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    stage.model.eval()
    policy = stage._forward(batch, sample_logprobs=True)
    assert (policy.sample_logprobs - reference).abs().max() > 1e-2, "the policy moved"
    torch.testing.assert_close(stage._reference_logprobs(batch), reference, rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in stage.model.named_parameters()} == trains
    moved = pair_terms(policy.sample_logprobs, reference, policy.sample_label_counts, stage.preference)
    margin = 0.5 * ((policy.sample_logprobs[0::2] - reference[0::2]) - (policy.sample_logprobs[1::2] - reference[1::2]))
    torch.testing.assert_close(moved["loss"], -F.logsigmoid(margin))


def test_preference_with_adapters_refuses_other_trainable_parts_and_pairs_need_a_preference_stage():
    from kangaroo.modules.sizes import kangaroo_tiny_config
    from kangaroo.training.stage import KangarooStage

    with pytest.raises(ValueError, match="the reference is the model with its adapters off.*set every trainable"):
        preference_stage(trainable={**FROZEN, "projector": True})
    plain = KangarooStage(kangaroo_tiny_config(), {**FROZEN, "language_model": True})
    with pytest.raises(ValueError, match="holds 2 preference pairs.*no model.preference: it would learn the rejected"):
        plain.training_step({"pairs": 2}, 0)


@pytest.fixture(scope="module")
def colour_pairs(trained_model, tmp_path_factory):
    """Preference pairs on the shared trained model's clips (``tests/trained.py``): asked the
    colour openly, the true colour in a sentence against another colour; training pairs on its
    training clips, held-out pairs on its held-out clips, prepared with its stage's settings."""
    import random

    import yaml

    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file
    from trained import COLOURS, QUESTION, TRAIN, VAL

    root = tmp_path_factory.mktemp("colour-pairs")
    media = trained_model.val_manifest.parent / "media"
    names, rng = list(COLOURS), random.Random(0)
    for split, count in (("train", TRAIN), ("val", VAL)):
        lines = []
        for i in range(count):
            colour = names[i % len(names)]
            other = rng.choice([c for c in names if c != colour])
            lines.append({"id": f"{split}-{i}-pair", "video": str(media / f"{split}-{i}.mp4"), "prompt": QUESTION,
                          "chosen": f"The screen is {colour}.", "rejected": f"The screen is {other}."})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    stage = yaml.safe_load(trained_model.stage_file.read_text())
    stage["model"].update(init_from=str(trained_model.stage_dir / "model.safetensors"),
                          preference={"beta": 0.1, "chosen_nll": 0.1},
                          optimizer={"lr": 2.0e-3, "min_lr": 1.0e-4, "warmup_steps": 2, "weight_decay": 0.0,
                                     "layer_decay": 1.0})
    stage["data"].update(train_dir=str(root / "data" / "train"), val_dir=str(root / "data" / "val"))
    stage["trainer"].update(max_steps=PREFERENCE_STEPS, val_check_interval=PREFERENCE_STEPS)
    sections = None
    for name, trainable, adapters in (("whole", {**FROZEN, "language_model": True}, None),
                                      ("lora", FROZEN, {"language_model": {"r": 8, "alpha": 16, "target_modules": [
                                          "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]}})):
        stage["model"].update(trainable=trainable, adapters=adapters)
        stage["trainer"]["default_root_dir"] = stage["trainer"]["logger"]["init_args"]["save_dir"] = str(root / name)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(stage))
        sections = sections or load_stage_file(str(root / f"{name}.yaml"))
    for split in ("train", "val"):
        prepare_dataset(str(root / f"{split}.jsonl"), str(root / "data" / split), sections["data"].prepare,
                        visual_layout(sections["model"].architecture), strict=True,
                        allowed_roots=[str(media)])
    return root


PREFERENCE_STEPS = 30


def logged(stdout: str, name: str) -> float:
    import re

    shown = re.search(rf"val/{name}\s*[│|]\s*([0-9.]+)", stdout)
    assert shown, stdout[-2000:]
    return float(shown.group(1))


def test_a_preference_stage_learns_held_out_pairs_from_the_trained_model(colour_pairs):
    """From the shared trained model, 30 DPO steps on training pairs, with the LLM training whole
    and with LoRA adapters alone: the held-out preference accuracy (the chosen reply above the
    rejected one) rises from the start's to at least 0.9, and the margin over the reference is
    positive on held-out pairs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    before = subprocess.run([sys.executable, "-m", "kangaroo.cli", "validate", "--config", str(colour_pairs / "whole.yaml")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert before.returncode == 0, before.stderr[-3000:]
    start = logged(before.stdout, "preference_accuracy")
    assert logged(before.stdout, "reward_margin") == 0.0, "the policy is the reference before any step"
    for name in ("whole", "lora"):
        fit = subprocess.run([sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(colour_pairs / f"{name}.yaml")],
                             capture_output=True, text=True, timeout=600, env=env)
        assert fit.returncode == 0, fit.stderr[-3000:]
        metrics = json.loads((colour_pairs / name / "stage-metrics.json").read_text())["eval"]
        assert metrics["val/preference_accuracy"] >= max(0.9, start + 0.1), (name, start, metrics)
        assert metrics["val/reward_margin"] > 0 and metrics["val/reward_accuracy"] >= 0.9, (name, metrics)
