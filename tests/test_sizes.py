"""Paper-scale shapes, built on the meta device: no weights, no memory."""

import pytest
import torch

from kangaroo.modules import kangaroo_8b, kangaroo_tiny
from kangaroo.modules.summary import model_summary


@pytest.fixture(scope="module")
def model_8b():
    with torch.device("meta"):
        return kangaroo_8b()


@pytest.fixture(scope="module")
def model_8b_stage1():
    with torch.device("meta"):
        return kangaroo_8b(image_size=224, patchify=False)


def test_8b_parameter_counts(model_8b):
    parts = model_summary(model_8b)["parts"]
    assert all(p.is_meta for p in model_8b.parameters())
    assert parts["vision_tower"]["params"] == pytest.approx(304e6, rel=0.01)
    assert parts["language_model"]["params"] == pytest.approx(8.03e9, rel=0.002)
    assert parts["projector"]["params"] == 1024 * 4096 + 4096
    assert parts["patchify"]["params"] == 1024 * 8 + 1024
    assert model_summary(model_8b)["total"] == pytest.approx(8.3e9, rel=0.01)


def test_8b_llm_is_llama3_8b_instruct_shaped(model_8b):
    cfg = model_8b.language_model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128256, 4096, 32)
    assert cfg.rope_parameters["rope_theta"] == 500000.0


def test_token_arithmetic_stages_1_2(model_8b_stage1):
    assert model_8b_stage1.tokens_per_frame == 256  # 224 px / 14 = 16 x 16 patches
    assert model_8b_stage1.num_visual_tokens(1) == 256
    assert model_8b_stage1.num_visual_tokens(8) == 2048


@pytest.mark.parametrize("frames, tokens", [(16, 2048), (64, 8192), (160, 20480)])
def test_token_arithmetic_stages_3_to_5(model_8b, frames, tokens):
    assert model_8b.vision_tower.tokens_per_frame == 1024  # 448 px / 14 = 32 x 32 patches
    assert model_8b.tokens_per_frame == 128  # after the 2x2x2 patchify
    assert model_8b.num_visual_tokens(frames) == tokens
    layout = model_8b.placeholder_ids(frames)
    assert len(layout) == tokens + frames // 2 + 2  # one separator per slot, <vi_start>, <vi_end>


def test_tiny_mirrors_the_8b_shapes():
    model = kangaroo_tiny()
    assert model.vision_tower.tokens_per_frame == 64 and model.tokens_per_frame == 8
    assert kangaroo_tiny(image_size=56, patchify=False).tokens_per_frame == 16


def test_no_yaml_under_configs_repeats_a_size():
    """configs/<model>/architecture.yaml names its size (kangaroo/modules/sizes.py holds the
    numbers); no YAML under configs/ writes a tower, visual tokens, projector or LLM shape again."""
    from pathlib import Path

    import yaml

    from kangaroo.modules.sizes import ARCHITECTURES

    configs = Path(__file__).resolve().parents[1] / "configs"
    for model in ARCHITECTURES:
        assert yaml.safe_load((configs / model / "architecture.yaml").read_text())["size"] == model

    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    sized = {"visual_tokens", "projector", "transformers_config", "timm_kwargs", "kernel", "name"}
    for path in configs.rglob("*.yaml"):
        written = yaml.safe_load(path.read_text()) or {}
        if path.name != "architecture.yaml":  # a stage file: its model's architecture
            written = (written.get("model") or {}).get("architecture") if isinstance(written, dict) else None
        assert not sized & set(keys(written)), f"{path} repeats {sorted(sized & set(keys(written)))}"
