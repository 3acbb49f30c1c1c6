"""The model folder, generation with a KV cache, and ``kangaroo chat``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_video
from kangaroo.data.video import MediaError
from kangaroo.inference import Frames, Generator, export_model, load_pretrained
from kangaroo.modules import build_kangaroo, kangaroo_tiny


@pytest.fixture(scope="module")
def generator(random_model_folder):
    return Generator(load_pretrained(str(random_model_folder[0])))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return random_video(tmp_path_factory.mktemp("clips") / "clip.mp4", frames=12)


def test_a_model_folder_holds_everything_and_loads_back_the_same_weights(random_model_folder):
    folder, model = random_model_folder
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json",
            "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    llm = config["architecture"]["language_model"]
    assert llm["pretrained"] is None and llm["trust_remote_code"] is False
    assert llm["transformers_config"]["hidden_size"] == 128, "the LLM config inline, not a hub id"
    loaded = load_pretrained(str(folder))
    assert not loaded.model.training
    mine = loaded.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(mine[name], value), name
    assert loaded.tokenizer.chat_template is not None
    assert loaded.preprocessing.sampling.num_frames == 4 and loaded.generation.stop_tokens == ["<|eot_id|>", "<|end_of_text|>"]


def test_a_folder_with_a_missing_or_mismatched_weight_file_is_an_error_naming_it(random_model_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_model_folder[0], broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    name = "projector.weight"
    state[name] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"projector\.weight: file \(3, 3\)"):
        load_pretrained(str(broken))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_pretrained(str(broken))
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_pretrained(str(tmp_path / "nowhere"))


def test_loading_in_bf16_keeps_the_rope_tables_training_keeps_in_fp32(random_model_folder, clip):
    """bf16 rounds the LLM's RoPE frequencies (0.5623413 -> 0.5625): at 22K positions the fastest
    phases move by radians. A bf16 load casts what FSDP2's bf16 training casts (parameters, the
    buffers inside blocks) and nothing else."""
    from kangaroo.modules.precision import keeps_fp32
    from kangaroo.training.fsdp import decoder_layers

    folder, model = random_model_folder
    loaded = load_pretrained(str(folder), dtype="bfloat16")
    stored = dict(model.named_buffers())
    buffers = dict(loaded.model.named_buffers())
    kept = {name for name in buffers if keeps_fp32(name)}
    assert "language_model.model.rotary_emb.inv_freq" in kept
    for name, buffer in buffers.items():
        assert buffer.dtype == (torch.float32 if name in kept else torch.bfloat16), name
        if name in kept:
            assert torch.equal(buffer, stored[name]), name
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # the same rule as training: FSDP2 casts the buffers inside the blocks it shards, keeps the rest
    blocks = [*model.vision_tower.trunk.blocks, *decoder_layers(model.language_model)]
    inside = {id(b) for block in blocks for b in block.buffers()}
    assert kept == {name for name, b in model.named_buffers() if id(b) not in inside}
    reply = Generator(loaded).generate([Generator(loaded).prompt([{"role": "user", "content": "hi"}], clip)],
                                       max_new_tokens=2)[0]
    assert reply.prompt_tokens > 0


def test_attention_auto_is_resolved_for_the_device_and_dtype_of_the_load(random_model_folder, tmp_path, monkeypatch):
    """On a machine with CUDA and flash-attn, ``auto`` trains with flash_attention_2; a load on the
    CPU, or in fp32, gets sdpa (flash-attn would fail at the first request) and says so."""
    import importlib.util
    import shutil

    from kangaroo.modules.language_model import resolve_attention

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert resolve_attention("auto") == "flash_attention_2", "a training run on GPUs"
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attention("flash_attention_2", "cpu", torch.float32) == "sdpa"
    assert resolve_attention("eager", "cpu", torch.float32) == "eager"

    auto = tmp_path / "auto"
    shutil.copytree(random_model_folder[0], auto)
    config = json.loads((auto / "config.json").read_text())
    config["architecture"]["language_model"]["attn_implementation"] = "auto"
    (auto / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(str(auto))
    assert loaded.attention == "sdpa" and "attention sdpa" in loaded.describe() and "cpu, float32" in loaded.describe()
    assert loaded.model.language_model.config._attn_implementation == "sdpa"


def test_export_from_a_stage_folder_a_checkpoint_and_a_sharded_checkpoint(tmp_path, tiny_tokenizer_dir, random_model_folder):
    """``kangaroo export`` takes a stage folder (its stage.yaml and model.safetensors) or a
    Lightning checkpoint inside its checkpoints/ folder; a mismatched weights file is refused."""
    import yaml

    from kangaroo.training.stage_file import read_stage_yaml

    _, model = random_model_folder
    stage = read_stage_yaml("configs/kangaroo-tiny/4-instruction-tuning.yaml")
    stage["model"]["architecture"]["language_model"].pop("pretrained")
    stage["data"]["prepare"]["tokenizer"] = tiny_tokenizer_dir
    stage_dir = tmp_path / "4-instruction-tuning"
    (stage_dir / "checkpoints").mkdir(parents=True)
    (stage_dir / "stage.yaml").write_text(yaml.safe_dump(stage))
    from kangaroo.training.stage_file import load_stage_file

    torch.manual_seed(1)
    architecture = load_stage_file(str(stage_dir / "stage.yaml"))["model"].architecture
    trained = build_kangaroo(architecture)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, stage_dir / "model.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}},
               stage_dir / "checkpoints" / "step=5.ckpt")
    out = subprocess.run([sys.executable, "-m", "kangaroo.cli", "export", str(stage_dir), "--output",
                          str(tmp_path / "from-stage")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    export_model(str(stage_dir / "checkpoints" / "step=5.ckpt"), str(tmp_path / "from-ckpt"))
    import torch.distributed.checkpoint as dcp  # a sharded (FSDP2) checkpoint folder, written by one process here

    sharded = stage_dir / "checkpoints" / "step=6.ckpt"
    dcp.save({"state_dict": {f"model.{k}": v.clone() for k, v in trained.state_dict().items()}}, checkpoint_id=sharded)
    export_model(str(sharded), str(tmp_path / "from-sharded"))
    preprocessing = json.loads((tmp_path / "from-stage" / "preprocessor_config.json").read_text())
    assert preprocessing["sampling"]["strategy"] == "dynamic" and preprocessing["max_tokens"] == 512
    for folder in ("from-stage", "from-ckpt", "from-sharded"):
        loaded = load_pretrained(str(tmp_path / folder)).model.state_dict()
        for name, value in trained.state_dict().items():
            assert torch.equal(loaded[name], value), (folder, name)
    other = kangaroo_tiny(patchify=False)  # the weights of another architecture: no patchify
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, stage_dir / "model.safetensors")
    with pytest.raises(ValueError, match="do not match the stage's architecture"):
        export_model(str(stage_dir), str(tmp_path / "mismatch"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(str(stage_dir / "checkpoints" / "step=5.ckpt"), str(tmp_path / "from-ckpt"))


def recompute_greedy(generator: Generator, prompt, steps: int) -> list[int]:
    """The reference without a cache: the whole sequence through the model at every step."""
    model = generator.model
    embeds, _ = generator.embed([prompt])
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            new = model.language_model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
            sequence = torch.cat([embeds, new], dim=1)
            hidden = model.language_model.base_model(inputs_embeds=sequence, use_cache=False).last_hidden_state
            token = int(model.output_head(hidden[:, -1]).argmax(-1))
            if token in generator.stop_ids:
                break
            tokens.append(token)
    return tokens


def test_kv_cache_greedy_decoding_equals_recomputing_the_whole_sequence(generator, clip):
    prompt = generator.prompt([{"role": "user", "content": "What colour is the shape?"}], clip)
    assert prompt.frames == 4 and prompt.input_ids.count(generator.model.visual_tokens.placeholder) > 0
    reply = generator.generate([prompt], max_new_tokens=64, do_sample=False)[0]
    assert reply.finish_reason == "length" and len(reply.token_ids) == 64, "64 tokens decoded: the check is long"
    assert reply.token_ids == recompute_greedy(generator, prompt, 64)


def test_a_batch_of_prompts_of_different_lengths_gives_each_ones_own_reply(generator, clip, tmp_path):
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(3).random((40, 30, 3)) * 255).astype("uint8")).save(image)
    prompts = [generator.prompt([{"role": "user", "content": text}], media) for text, media in (
        ("What colour is the shape?", clip),
        ("Describe the video in detail, please, with every shape and colour.", clip),
        ("Hi", None),
        ("What is in this picture?", str(image)))]
    assert len({len(p.input_ids) for p in prompts}) == 4
    together = generator.generate(prompts, max_new_tokens=12, do_sample=False)
    alone = [generator.generate([p], max_new_tokens=12, do_sample=False)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in alone] == [12] * 4, "every reply decoded in full: the check covers 12 tokens"
    assert [r.prompt_tokens for r in together] == [len(p.input_ids) for p in prompts]


def test_streaming_joins_to_the_reply_and_sampling_follows_its_seed(generator, clip):
    prompt = generator.prompt([{"role": "user", "content": "What happens?"}], clip)
    pieces = list(generator.stream(prompt, max_new_tokens=20, do_sample=False))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == generator.generate([prompt], max_new_tokens=20, do_sample=False)[0].text
    first = generator.generate([prompt], max_new_tokens=20, temperature=1.5, top_p=0.95, seed=7)[0]
    again = generator.generate([prompt], max_new_tokens=20, temperature=1.5, top_p=0.95, seed=7)[0]
    greedy = generator.generate([prompt], max_new_tokens=20, temperature=0)[0]
    assert first.token_ids == again.token_ids
    assert first.token_ids != greedy.token_ids, "temperature 1.5 samples; 0 is greedy"


def test_decoded_frames_go_in_directly_and_bad_media_is_a_one_line_error(generator, clip, tmp_path):
    from kangaroo.data.video import FrameSampling, read_video

    decoded = read_video(clip, FrameSampling("uniform", num_frames=4))
    by_path = generator.prompt([{"role": "user", "content": "What?"}], clip)
    by_frames = generator.prompt([{"role": "user", "content": "What?"}], Frames(decoded.frames, decoded.timestamps))
    assert by_frames.input_ids == by_path.input_ids
    assert torch.equal(by_frames.pixels, by_path.pixels) and torch.equal(by_frames.timestamps, by_path.timestamps)
    with pytest.raises(MediaError, match="missing file"):
        generator.prompt([{"role": "user", "content": "What?"}], str(tmp_path / "nothing.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(MediaError):
        generator.prompt([{"role": "user", "content": "What?"}], str(corrupt))
    with pytest.raises(ValueError, match="last message must be the user's"):
        generator.prompt([{"role": "assistant", "content": "A"}], clip)


def test_frames_are_resized_as_they_are_decoded_and_give_the_same_pixels(generator, tmp_path):
    """A request holds its clip at the model's resolution, not the file's: 16 frames of a 640x360
    video never sit in memory at full size (before: 16 decoded frames and their stack), and the
    pixels equal those of resizing the full-size frames, in every resize mode."""
    import tracemalloc

    from kangaroo.data.transforms import FrameScaler, fit_frames
    from kangaroo.data.video import FrameSampling, read_video

    video = random_video(tmp_path / "wide.mp4", frames=16, size=(360, 640))
    sampling = FrameSampling("uniform", num_frames=16, multiple_of=2)
    full = read_video(video, sampling).frames
    frame_bytes = full[0].nbytes
    for mode in ("pad", "crop", "stretch"):
        small = read_video(video, sampling, FrameScaler(112, mode)).frames
        assert small.shape[1:3] == {"pad": (63, 112), "crop": (112, 199), "stretch": (112, 112)}[mode]
        assert torch.equal(fit_frames(small, 112, mode), fit_frames(full, 112, mode)), mode
    question = [{"role": "user", "content": "What?"}]
    tracemalloc.start()
    try:
        by_path = generator.prompt(question, video, sampling=sampling)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert by_path.frames == 16
    assert peak < 6 * frame_bytes, f"decoding held {peak / frame_bytes:.1f} full-size frames at once"
    by_frames = generator.prompt(question, Frames(full, read_video(video, sampling).timestamps), sampling=sampling)
    assert torch.equal(by_frames.pixels, by_path.pixels)


def test_a_conversation_about_a_video_is_decoded_and_prefilled_once(random_model_folder, tmp_path):
    """The second question about a video skips the decode and the vision tower and prefills only
    its new tokens; every reply equals the uncached one, a changed history or another video with
    the same token ids is no false hit, and the cache keeps within its budget."""
    from kangaroo.data.video import FrameSampling

    loaded = load_pretrained(str(random_model_folder[0]))
    cached, plain = Generator(loaded), Generator(loaded, cache_mb=0)
    video = random_video(tmp_path / "long.mp4", frames=24, seed=3)
    other = random_video(tmp_path / "other.mp4", frames=24, seed=4)
    sampling = FrameSampling("uniform", num_frames=24, multiple_of=2)
    towers, prefills = [], []
    loaded.model.vision_tower.register_forward_hook(lambda *_: towers.append(1))
    loaded.model.language_model.model.register_forward_pre_hook(
        lambda _, args, kwargs: prefills.append((kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None
                                                 else kwargs["input_ids"]).shape[1]), with_kwargs=True)

    def reply(generator, messages, media=video):
        prompt = generator.prompt(messages, media, sampling=sampling)
        return prompt, generator.generate([prompt], max_new_tokens=6, temperature=0)[0]

    first = [{"role": "user", "content": "What happens?"}]
    p1, r1 = reply(cached, first)
    assert reply(plain, first)[1].token_ids == r1.token_ids
    second = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
    towers.clear(), prefills.clear()
    p2, r2 = reply(cached, second)
    assert towers == [], "the frames and visual features came from the cache"
    assert prefills[0] < len(p2.input_ids) - len(p1.input_ids) + 12, (prefills[0], len(p1.input_ids), len(p2.input_ids))
    assert cached.cache.stats()["hits"] == 1
    assert reply(plain, second)[1].token_ids == r2.token_ids, "the same reply as prefilling everything"

    edited = [{"role": "user", "content": "What colour is it?"}, *second[1:]]
    assert reply(cached, edited)[1].token_ids == reply(plain, edited)[1].token_ids, "a history that no longer matches"
    towers.clear()
    p_other, r_other = reply(cached, second, other)
    assert p_other.input_ids == p2.input_ids and p_other.media_key != p2.media_key
    assert towers, "another video with the same token ids is not served from the first one's cache"
    assert r_other.token_ids == reply(plain, second, other)[1].token_ids

    small = Generator(loaded, cache_mb=1.5)  # one conversation's frames and KV cache (1.1 MB), not two
    keys = []
    for media in (video, other):
        prompt = small.prompt(first, media, sampling=sampling)
        small.generate([prompt], max_new_tokens=2, temperature=0)
        keys.append(prompt.media_key)
    assert 0 < small.cache.nbytes <= 1.5 * 2**20, small.cache.stats()
    assert small.cache.frames(keys[0]) is None and small.cache.frames(keys[1]) is not None, "least recently used out"


def chat(folder, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kangaroo.cli", "chat", "--model", str(folder), *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


def audio_only(path: Path) -> str:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)


def test_chat_session_goes_on_after_bad_files_and_keeps_its_history(random_model_folder, clip, tmp_path):
    folder, _ = random_model_folder
    history = tmp_path / "history.json"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"garbage" * 50)
    sound = audio_only(tmp_path / "sound.m4a")
    session = "\n".join(["What colour is it?", f"/video {tmp_path / 'missing.mp4'}", f"/video {corrupt}",
                         f"/video {sound}", "这是什么颜色？", "/nonsense", "/quit"]) + "\n"
    out = chat(folder, "--video", clip, "--history", str(history), "--temperature", "0", "--max-new-tokens", "6",
               stdin=session)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("kangaroo: error:")]
    assert len(errors) == 4, out.stderr  # missing, corrupt, audio only, unknown command: one line each
    assert "missing file" in errors[0]
    saved = json.loads(history.read_text())
    assert saved["media"] == clip
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][2]["content"] == "这是什么颜色？"
    resumed = chat(folder, "--history", str(history), "--query", "And the shape?", "--temperature", "0",
                   "--max-new-tokens", "6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(json.loads(history.read_text())["messages"]) == 6, "the third round went on the kept conversation"
    missing = chat(folder, "--video", str(tmp_path / "missing.mp4"), "--query", "What?")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("kangaroo: error: missing file")


def test_chat_on_the_trained_model_names_the_colour_of_held_out_clips(trained_model):
    from trained import COLOURS

    for colour, clip in trained_model.clips.items():
        question = "What colour is the screen?\nA. red\nB. green\nC. blue\nD. yellow\n" \
                   "Answer with the option's letter from the given choices directly."
        out = chat(trained_model.folder, "--video", str(clip), "--query", question, "--temperature", "0")
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "ABCD"[list(COLOURS).index(colour)], (colour, out.stdout)
