import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from kangaroo.modules import VisionTowerConfig, build_vision_tower

TINY_CLIP = "EVA02-Tiny-Kangaroo-Test"


@pytest.fixture(scope="module")
def tiny_open_clip_checkpoint(tmp_path_factory):
    """Registers a tiny EVA02 open_clip model config and saves a random checkpoint of it."""
    root = tmp_path_factory.mktemp("open_clip")
    config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(1)
    clip = open_clip.create_model(TINY_CLIP)
    path = root / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return path


def test_local_open_clip_checkpoint_matches_open_clip_at_a_new_resolution(tiny_open_clip_checkpoint):
    config = VisionTowerConfig(TINY_CLIP, image_size=112, pretrained=str(tiny_open_clip_checkpoint))
    tower = build_vision_tower(config, load_weights=True).eval()
    reference = open_clip.create_model(TINY_CLIP, pretrained=str(tiny_open_clip_checkpoint),
                                       force_image_size=112).visual.trunk.eval()
    saved = torch.load(tiny_open_clip_checkpoint, weights_only=True)
    torch.testing.assert_close(tower.trunk.blocks[3].attn.qkv.weight, saved["visual.trunk.blocks.3.attn.qkv.weight"])
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours, theirs = tower(pixels), reference.forward_features(pixels)[:, 1:]
    assert ours.shape == (2, 64, 192)
    torch.testing.assert_close(ours, theirs)


def test_random_weights_are_not_loaded_without_load_weights(tiny_open_clip_checkpoint):
    config = VisionTowerConfig(TINY_CLIP, image_size=112, pretrained=str(tiny_open_clip_checkpoint))
    tower = build_vision_tower(config, load_weights=False)
    saved = torch.load(tiny_open_clip_checkpoint, weights_only=True)
    assert not torch.equal(tower.trunk.blocks[3].attn.qkv.weight, saved["visual.trunk.blocks.3.attn.qkv.weight"])


def test_timm_tower_loads_a_safetensors_file_and_resamples_positions(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("eva02_tiny_patch14_224", num_classes=0)
    path = tmp_path / "tower.safetensors"
    save_file(source.state_dict(), str(path))
    tower = build_vision_tower(VisionTowerConfig("timm:eva02_tiny_patch14_224", 56, str(path)), load_weights=True)
    torch.testing.assert_close(tower.trunk.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert tower.trunk.pos_embed.shape == (1, 1 + 16, 192)  # 56 px / 14 = 4 x 4 patches
    assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 16, 192)


@pytest.mark.slow
def test_eva02_l14_at_448_equals_open_clip_own_model():
    torch.manual_seed(3)
    tower = build_vision_tower(VisionTowerConfig("EVA02-L-14", image_size=448)).eval()
    assert tower.grid == (32, 32) and tower.width == 1024
    reference = open_clip.create_model("EVA02-L-14", force_image_size=448).visual.trunk.eval()
    missing, unexpected = reference.load_state_dict(tower.trunk.state_dict(), strict=False)
    assert missing == ["head.weight", "head.bias"] and unexpected == []
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ours = tower(pixels)
        theirs = reference.forward_features(pixels)[:, 1:]
    assert ours.shape == (1, 1024, 1024)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name, message", [
    ("EVA99-L-14", "unknown open_clip vision model 'EVA99-L-14'"),
    ("timm:not_a_model", "unknown timm vision model 'not_a_model'"),
    ("ViT-B-32", "has no timm trunk"),
])
def test_unknown_or_unsupported_names(name, message):
    with pytest.raises(ValueError, match=message):
        build_vision_tower(VisionTowerConfig(name, image_size=224))


def test_resolution_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of .* patch size 14"):
        build_vision_tower(VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=100))


def test_wrong_frame_size_is_an_error():
    tower = build_vision_tower(VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=56))
    with pytest.raises(ValueError, match="expects 56x56 frames, got \\(112, 112\\)"):
        tower(torch.randn(1, 3, 112, 112))


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match="nope.safetensors"):
        build_vision_tower(VisionTowerConfig("timm:eva02_tiny_patch14_224", 56, str(missing)), load_weights=True)
    with pytest.raises(ValueError, match="nope.safetensors"):
        build_vision_tower(VisionTowerConfig(TINY_CLIP, 112, str(missing)), load_weights=True)


def test_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        VisionTowerConfig(image_size=0)
    with pytest.raises(ValueError, match="timm_kwargs"):
        VisionTowerConfig("EVA02-L-14", timm_kwargs={"depth": 2})
