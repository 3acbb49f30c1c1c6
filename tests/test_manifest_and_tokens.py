import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kangaroo.data.manifest import ManifestSample, Reject, read_manifest
from kangaroo.data.tokenization import ChatEncoder
from kangaroo.data.transforms import CLIP_MEAN, fit_frames, normalize
from kangaroo.modules import IGNORE_INDEX
from kangaroo.modules.sizes import TINY_VISUAL_TOKENS


def write_manifest(tmp_path, records):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return str(path)


def test_manifest_forms_and_rejects(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    path = write_manifest(tmp_path, [
        {"id": "conv", "video": "a.mp4", "conversations": [{"role": "user", "content": "<video>Hi"},
                                                          {"role": "assistant", "content": "Hello"}],
         "meta": {"category": "shapes"}},
        {"id": "cap", "video": "a.mp4", "task": "caption", "caption": "一个红色的圆。", "meta": {"language": "zh"}},
        {"id": "mcq", "image": "a.mp4", "task": "mcq", "question": "Colour?", "options": ["red", "blue"], "answer": "B"},
        "{broken",
        {"id": "noasst", "conversations": [{"role": "user", "content": "hi"}]},
        {"id": "outside", "video": "../elsewhere/a.mp4", "task": "caption", "caption": "x"},
        {"id": "badmcq", "task": "mcq", "question": "q", "options": ["a", "b"], "answer": "C"},
        {"id": "both", "video": "a.mp4", "image": "a.mp4", "task": "caption", "caption": "x"},
        {"conversations": []},
    ])
    items = {item.id: item for item in read_manifest(path)}
    assert isinstance(items["conv"], ManifestSample) and items["conv"].meta == {"category": "shapes"}
    assert items["conv"].media_path == str(tmp_path / "a.mp4")
    assert items["cap"].conversations[1]["content"] == "一个红色的圆。"
    assert items["cap"].conversations[0]["content"] in ("描述这个视频。", "这个视频里发生了什么？", "请为视频写一句简短的描述。")
    assert "A. red\nB. blue" in items["mcq"].conversations[0]["content"] and items["mcq"].conversations[1]["content"] == "B"
    reasons = {k: v.reason for k, v in items.items() if isinstance(v, Reject)}
    assert reasons["line 4"].startswith("malformed JSON")
    assert "no assistant turn" in reasons["noasst"]
    assert "outside the allowed roots" in reasons["outside"]
    assert "answer must be one of" in reasons["badmcq"]
    assert "at most one media item" in reasons["both"]
    assert reasons["line 9"] == "missing or empty 'id'"


def test_templates_are_reproducible(tmp_path):
    path = write_manifest(tmp_path, [{"id": f"c{i}", "task": "caption", "caption": "x"} for i in range(5)])
    first = [s.conversations for s in read_manifest(path)]
    assert first == [s.conversations for s in read_manifest(path)]


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer_dir):
    return ChatEncoder(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), TINY_VISUAL_TOKENS)


def test_labels_cover_only_assistant_turns(encoder):
    tok = encoder.tokenizer
    conversation = [{"role": "user", "content": "Describe the video."}, {"role": "assistant", "content": "A red circle."},
                    {"role": "user", "content": "颜色？"}, {"role": "assistant", "content": "红色"}]
    media = [TINY_VISUAL_TOKENS.vi_start] + [TINY_VISUAL_TOKENS.placeholder] * 4 + [TINY_VISUAL_TOKENS.eov,
                                                                                    TINY_VISUAL_TOKENS.vi_end]
    out = encoder.encode(conversation, media)
    assert len(out.input_ids) == len(out.labels)
    labelled = [i for i, l in zip(out.input_ids, out.labels) if l != IGNORE_INDEX]
    assert tok.decode(labelled) == "A red circle.<|eot_id|>红色<|eot_id|>"
    assert all(l == i for i, l in zip(out.input_ids, out.labels) if l != IGNORE_INDEX)
    # The layout sits in the first user turn, unlabelled, exactly once.
    start = out.input_ids.index(TINY_VISUAL_TOKENS.vi_start)
    assert out.input_ids[start : start + len(media)] == media
    assert out.input_ids.count(TINY_VISUAL_TOKENS.placeholder) == 4
    # The whole sequence is the chat template's own rendering.
    expected = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode([i for i in out.input_ids if i not in media]).replace("\n", "") == expected.replace("\n", "")


def test_media_marker_places_the_layout(encoder):
    media = [TINY_VISUAL_TOKENS.vi_start, TINY_VISUAL_TOKENS.placeholder, TINY_VISUAL_TOKENS.eov,
             TINY_VISUAL_TOKENS.vi_end]
    out = encoder.encode([{"role": "user", "content": "Look: <video> now?"}, {"role": "assistant", "content": "ok"}],
                         media)
    text = encoder.tokenizer.decode(out.input_ids)
    assert "Look: <vi_start><|visual|><eov><vi_end> now?" in text


def test_text_with_visual_special_tokens_is_refused(encoder):
    with pytest.raises(ValueError, match="visual layout's special tokens"):
        encoder.encode([{"role": "user", "content": "sneaky <|visual|>"}, {"role": "assistant", "content": "x"}])


def test_fit_frames_modes():
    frames = np.full((2, 40, 80, 3), 200, np.uint8)
    padded = fit_frames(frames, 56, "pad")
    assert padded.shape == (2, 3, 56, 56) and padded.dtype == torch.uint8
    assert padded[0, 0, 28, 28] == 200 and padded[0, 0, 0, 0] == round(CLIP_MEAN[0] * 255)
    assert (fit_frames(frames, 56, "crop") == 200).all() and (fit_frames(frames, 56, "stretch") == 200).all()
    normed = normalize(padded)
    assert normed.dtype == torch.float32 and abs(normed[0, 0, 0, 0]) < 0.01  # the mean pads to ~0
