"""The tiny world's parts: frames, described chats, the tokenizer's handling of Chinese, and the
pre-trained tower loading into the stage configs' vision tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kangaroo.world.pretrain import pretrain_llm, pretrain_vision, thirds
from kangaroo.world.render import (COLOURS, COUNTS, DIRECTIONS, SHAPES, ZH, World, WorldConfig, corpus_of, described_chats,
                                   description_of, long_question, random_frames, stage_records)
from kangaroo.world.tokenizer import write_tokenizer

SMALL = WorldConfig(images=4, short_videos=2, dense_videos=2, instruction_videos=3, long_videos=2, val_short=3,
                    val_long=3, vision_steps=3)


def small_world(root):
    """A small world rendered into ``root``: the world, its records by stage, the training ones."""
    for split in ("train", "val"):
        (root / "media" / split).mkdir(parents=True)
    world = World(str(root), SMALL)
    records = stage_records(world, lambda n: None)
    return world, records, [r for splits in records.values() for r in splits["train"]]


def test_random_frames_show_one_whole_shape_or_none():
    frames, classes, centres = random_frames(64, 64, np.random.default_rng(0))
    assert frames.shape == (64, 64, 64, 3) and frames.dtype == np.uint8
    colours = np.array(list(COLOURS.values()))
    for frame, (colour, shape) in zip(frames, classes):
        painted = (frame[..., None, :] == colours).all(-1).any(-1)
        if shape == 4:
            assert colour == 4 and not painted.any()
            continue
        assert painted.sum() > 50, "the shape is drawn"
        assert (frame[painted] == colours[colour]).all(), "in its own colour"
        border = np.concatenate([painted[0], painted[-1], painted[:, 0], painted[:, -1]])
        assert not border.any(), "never cut by the border"
    assert ((centres >= 0) & (centres <= 1)).all()
    assert set(classes[:, 1]) == set(range(5)), "all shapes and the empty frame occur"


def test_described_chats_tell_the_media_in_words_and_manifests_never_do(tmp_path):
    world, records, train = small_world(tmp_path)
    chats = described_chats(train, world.facts)
    assert len(chats) == len(train)
    for record, chat in zip(train, chats):
        said = description_of(world.facts[record.get("video") or record.get("image")], record["meta"]["language"])
        user = next(turn["content"] for turn in chat if turn["role"] == "user")
        assert said in user and "<video>" not in user and "<image>" not in user
    for record in train:  # what the media shows stays out of the manifests
        assert set(record) <= {"id", "image", "video", "task", "caption", "question", "options", "answer",
                               "conversations", "meta"}
    # A long clip's facts are its events in time order, distinct shapes in distinct windows; its
    # questions name none of them.
    for long_record in (r for r in records["5-long-video-tuning"]["val"] if r["meta"]["category"] == "long"):
        facts = world.facts[long_record["video"]]
        shapes, windows = [f["shape"] for f in facts], [f["window"] for f in facts]
        assert 1 <= len(facts) <= SMALL.long_events and len(set(shapes)) == len(shapes) and set(shapes) <= set(SHAPES)
        assert windows == sorted(set(windows)) and all(f["start"] == f["window"] * SMALL.long_event_seconds
                                                       for f in facts)
        assert not any(shape in long_record["question"] for shape in SHAPES)


def test_long_clips_are_asked_how_many_shapes_appear_and_single_event_clips_when(tmp_path):
    world, records, _ = small_world(tmp_path)
    long_train = [r for r in records["5-long-video-tuning"]["train"] if r["meta"]["category"] == "long"]
    asked: dict[str, set[str]] = {}
    for record in long_train:
        asked.setdefault(record["video"], set()).add(record["id"].rsplit("-", 1)[1])
    assert len(asked) == SMALL.long_videos and len({r["id"] for r in long_train}) == len(long_train)
    for video, kinds in asked.items():
        assert kinds == ({"count", "when"} if len(world.facts[video]) == 1 else {"count"}), (video, kinds)
    assert any(len(kinds) == 2 for kinds in asked.values()), "half the training clips hold a single event"
    long_val = [r for r in records["5-long-video-tuning"]["val"] if r["meta"]["category"] == "long"]
    assert len(long_val) == len({r["video"] for r in long_val}) == SMALL.val_long  # one question each
    assert {r["id"].rsplit("-", 1)[1] for r in long_val} == {"count", "when"}


def long_facts(windows: list[int]) -> list[dict]:
    return [{"shape": SHAPES[k], "colour": "red", "direction": "up", "start": w * 5.0, "end": w * 5.0 + 4, "window": w}
            for k, w in enumerate(windows)]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_long_clip_is_told_with_the_count_and_times_its_questions_ask_about(lang):
    for windows in ([0], [2], [3], [0, 1], [1, 3], [0, 2, 3], [0, 1, 2, 3]):
        facts = long_facts(windows)
        told = description_of(facts, lang)
        _, options, letter = long_question(facts, "count", lang, SMALL)
        assert options["ABCD".index(letter)] == COUNTS[lang][len(windows) - 1]
        assert told.lower().startswith(("出现了" if lang == "zh" else "") + options["ABCD".index(letter)])
        for fact in facts:
            said = f"{fact['start']:g}到{fact['end']:g}秒" if lang == "zh" else f"From {fact['start']:g} to {fact['end']:g} s"
            assert said in told and told.index(said) < told.index(ZH[fact["shape"]] if lang == "zh" else fact["shape"])
    for window in range(SMALL.long_events):
        _, options, letter = long_question(long_facts([window]), "when", lang, SMALL)
        start, end = options["ABCD".index(letter)].rstrip(" s秒").split("-")
        assert (float(start), float(end)) == (window * 5.0, window * 5.0 + 5)
    with pytest.raises(ValueError, match="its only event"):
        long_question(long_facts([0, 2]), "when", lang, SMALL)


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_a_moving_shape_sets_off_from_the_middle_towards_the_side_its_direction_names(tmp_path, direction):
    import random

    world = World(str(tmp_path), SMALL)
    size = SMALL.size
    base = np.zeros((size, size, 3), np.uint8)
    frames = world._moving(base, "square", "red", direction, 16, random.Random(0))
    centres = []
    for frame in frames:
        ys, xs = np.nonzero(frame.max(-1) > 0)
        centres.append(np.array([xs.mean(), ys.mean()]))
    assert np.abs(centres[0] - size / 2).max() <= 3, "it starts in the middle"
    travelled = centres[-1] - centres[0]
    assert np.sign(travelled).tolist() == [float(v) for v in DIRECTIONS[direction]], travelled
    assert np.abs(travelled).max() > size / 5


def test_tiny_llm_pretraining_reports_held_out_accuracy_per_group(tmp_path):
    from transformers import LlamaForCausalLM

    world, records, train = small_world(tmp_path)
    tokenizer = write_tokenizer(str(tmp_path), corpus_of(train))
    held_out = records["5-long-video-tuning"]["val"]
    config = WorldConfig(llm_steps=3, llm_batch=4)
    report = pretrain_llm(str(tmp_path), tokenizer, described_chats(train, world.facts), config,
                           list(zip(described_chats(held_out, world.facts), [r["meta"]["category"] for r in held_out])))
    assert set(report["accuracy"]) == {"short", "long"}
    assert all(0 <= v <= 1 for v in report["accuracy"].values()) and report["final_loss"] > 0
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    assert model.config.vocab_size == 1024


def test_tiny_tokenizer_learns_chinese_characters_not_whole_sentences():
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    corpus = ["一个黄色的圆环。", "一个红色的横条向左移动。", "A red ring moves left."] * 40
    tokenizer = build_tiny_tokenizer(corpus)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("一个黄色的圆环。", add_special_tokens=False)]
    assert pieces == ["一", "个", "黄", "色", "的", "圆", "环", "。"]
    english = [tokenizer.decode([i]) for i in tokenizer.encode("A red ring moves left.", add_special_tokens=False)]
    assert "".join(english) == "A red ring moves left." and len(english) < 10


@pytest.mark.parametrize("image_size", [56, 112])
def test_pretrained_tiny_tower_loads_into_the_stage_tower(tmp_path, image_size):
    from safetensors.torch import load_file

    from kangaroo.modules.vision_tower import VisionTowerConfig, build_vision_tower

    report = pretrain_vision(str(tmp_path), SMALL)
    assert set(report) == {"colour_accuracy", "shape_accuracy", "centre_error_px", "third_accuracy"}
    assert all(0 <= report[k] <= 1 for k in ("colour_accuracy", "shape_accuracy", "third_accuracy"))
    saved = load_file(tmp_path / "vision.safetensors")
    config = VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=image_size, timm_kwargs={"depth": 4, "global_pool": "token"},
                               pretrained=str(tmp_path / "vision.safetensors"))
    tower = build_vision_tower(config, load_weights=True)
    own = tower.trunk.state_dict()
    assert set(own) == set(saved)
    for name, value in saved.items():
        if name == "pos_embed":  # resampled to the stage's grid
            grid = image_size // 14
            assert own[name].shape == (1, 1 + grid * grid, value.shape[-1])
            assert torch.equal(own[name], value) == (image_size == SMALL.vision_image_size)
        else:
            assert torch.equal(own[name], value), name


def test_pretrained_tower_tokens_come_out_standardised(tmp_path):
    from kangaroo.data.transforms import fit_frames, normalize
    from kangaroo.modules.vision_tower import VisionTowerConfig, build_vision_tower

    pretrain_vision(str(tmp_path), SMALL)
    config = VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=56, timm_kwargs={"depth": 4, "global_pool": "token"},
                               pretrained=str(tmp_path / "vision.safetensors"))
    tower = build_vision_tower(config, load_weights=True).eval()
    frames, _, _ = random_frames(128, 64, np.random.default_rng(7))
    with torch.no_grad():
        tokens = tower(normalize(fit_frames(frames, 56))).reshape(-1, tower.width)
    assert tokens.mean(0).abs().mean() < 0.2
    assert 0.7 < tokens.std(0).mean() < 1.3


def test_thirds_split_the_frame_evenly_and_keep_the_far_edge_in_the_last_third():
    centres = np.array([[0.0, 0.32], [0.34, 0.66], [0.67, 1.0]])
    assert thirds(centres).tolist() == [[0, 0], [1, 1], [2, 2]]
