"""kangaroo import: a checkpoint in the assumed layout of the released model converts through its
key map into a model folder that gives the logits of the model it was written from; a renamed
key and a shape mismatch are named; a stage starts from the model folder (init_from: DIR)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import collate, make_sample
from kangaroo.cli import main
from kangaroo.inference.importing import check_visual_tokens, import_checkpoint, plan, read_layout
from kangaroo.modules import build_kangaroo, kangaroo_tiny
from kangaroo.modules.layout import VisualTokens
from kangaroo.modules.sizes import named_config

# Our names -> the released layout's, written out here on their own (not by inverting the map):
# the language model under model.* and lm_head.*, the tower's EVA-CLIP names under vision_tower.*,
# patchify and projector under mm_projector.*.
RELEASED = [
    (r"language_model\.lm_head\.(.*)", r"lm_head.\1"),
    (r"language_model\.model\.(.*)", r"model.\1"),
    (r"vision_tower\.trunk\.blocks\.(\d+)\.attn\.(q|v)_proj\.bias", r"vision_tower.blocks.\1.attn.\2_bias"),
    (r"vision_tower\.trunk\.blocks\.(\d+)\.attn\.norm\.(.*)", r"vision_tower.blocks.\1.attn.inner_attn_ln.\2"),
    (r"vision_tower\.trunk\.blocks\.(\d+)\.mlp\.fc1_g\.(.*)", r"vision_tower.blocks.\1.mlp.w1.\2"),
    (r"vision_tower\.trunk\.blocks\.(\d+)\.mlp\.fc1_x\.(.*)", r"vision_tower.blocks.\1.mlp.w2.\2"),
    (r"vision_tower\.trunk\.blocks\.(\d+)\.mlp\.norm\.(.*)", r"vision_tower.blocks.\1.mlp.ffn_ln.\2"),
    (r"vision_tower\.trunk\.(blocks\.\d+\.mlp)\.fc2\.(.*)", r"vision_tower.\1.w3.\2"),  # SwiGLU towers only
    (r"vision_tower\.trunk\.(.*)", r"vision_tower.\1"),
    (r"patchify\.conv\.(.*)", r"mm_projector.patchify.\1"),
    (r"projector\.(.*)", r"mm_projector.linear.\1"),
]
EXTRA = {"vision_tower.head.weight": (8, 8), "model.layers.0.self_attn.rotary_emb.inv_freq": (4,)}  # dropped on purpose


def released(state: dict, swiglu: bool) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, name in RELEASED:
            if "w3" in name and not swiglu:
                continue
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, name, key)] = value
                break
    assert len(out) == len(state)
    return out


def test_the_released_maps_covers_the_8b_model_key_by_key_with_its_assumptions_listed():
    with torch.device("meta"):
        model = build_kangaroo(named_config("kangaroo-8b"), load_weights=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = {**{k: shapes[o] for k, o in zip(released(shapes, swiglu=True), shapes)}, **EXTRA}
    result = plan(read_layout("kangaroo-released"), source, shapes)
    assert result.ok, result.report()
    assert len(result.mapped) == len(shapes) == 805 and sorted(result.skipped) == sorted(EXTRA)
    assert result.mapped["vision_tower.trunk.blocks.3.attn.q_proj.bias"] == "vision_tower.blocks.3.attn.q_bias"
    assert result.mapped["vision_tower.trunk.blocks.3.mlp.fc2.weight"] == "vision_tower.blocks.3.mlp.w3.weight"
    assert "EVA-CLIP SwiGLU: w1 is the gate (timm fc1_g)" in result.report()


@pytest.fixture(scope="module")
def released_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny model written as the released layout's two shards beside the tokenizer."""
    from transformers import AutoTokenizer

    torch.manual_seed(3)
    model = kangaroo_tiny().eval()
    source = tmp_path_factory.mktemp("released")
    state = {**released(model.state_dict(), swiglu=False), **{k: torch.zeros(s) for k, s in EXTRA.items()}}
    keys = sorted(state)
    for index, part in enumerate((keys[::2], keys[1::2])):
        save_file({k: state[k].contiguous() for k in part}, source / f"model-0000{index + 1}-of-00002.safetensors")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(source)
    return source, model


def test_a_checkpoint_in_the_released_layout_imports_to_a_folder_with_the_same_logits(released_checkpoint, tmp_path,
                                                                                    capsys):
    from kangaroo.inference import load_pretrained
    from kangaroo.modules import kangaroo_tiny_config
    from kangaroo.training.stage import KangarooStage

    source, model = released_checkpoint
    output = tmp_path / "imported"
    assert main(["import", str(source), "--layout", "kangaroo-released", "--architecture", "kangaroo-tiny",
                 "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"mapped {len(model.state_dict())} tensors, skipped 2" in printed and "assumptions" in printed
    loaded = load_pretrained(str(output))
    batch = collate([make_sample(model, 4, 6, seed=1), make_sample(model, 2, 3, seed=2)])
    with torch.no_grad():
        expected = model(**batch, return_logits=True).logits
        got = loaded.model(**batch, return_logits=True).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same float32 weights through the same ops

    # a stage starts from the model folder
    stage = KangarooStage(kangaroo_tiny_config(), {"vision_tower": False, "patchify": True, "projector": True,
                                                   "language_model": False}, init_from=str(output))
    stage.configure_model()
    for key, value in model.state_dict().items():
        assert torch.equal(stage.model.state_dict()[key], value), key


def test_a_renamed_key_is_listed_by_name_and_a_shape_mismatch_names_the_key_and_both_shapes(released_checkpoint,
                                                                                         tmp_path, capsys):
    from safetensors.torch import load_file

    source, _ = released_checkpoint
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
    renamed = dict(state)
    renamed["model.layers.0.mlp.gate.weight"] = renamed.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    assert main(["import", str(tmp_path / "renamed.safetensors"), "--layout", "kangaroo-released",
                 "--architecture", "kangaroo-tiny", "--dry-run"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"source keys no rule takes:\n  model\.layers\.0\.mlp\.gate\.weight \(rules gave "
                     r"\['language_model\.model\.layers\.0\.mlp\.gate\.weight'\]", printed), printed
    assert "model keys no source key gives:\n  language_model.model.layers.0.mlp.gate_proj.weight" in printed

    shaped = dict(state)
    shaped["mm_projector.linear.weight"] = shaped["mm_projector.linear.weight"][:, :-1].contiguous()
    save_file(shaped, tmp_path / "shaped.safetensors")
    with pytest.raises(ValueError, match=re.escape("projector.weight (from mm_projector.linear.weight): "
                                                   "source (128, 191), model (128, 192)")):
        import_checkpoint(str(tmp_path / "shaped.safetensors"), "kangaroo-released", str(tmp_path / "out"),
                          architecture="kangaroo-tiny", tokenizer=str(source))
    assert not (tmp_path / "out").exists()


def test_an_unknown_or_malformed_layout_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"unknown layout 'kangaroo-relased'.*shipped \['kangaroo', 'kangaroo-released'\]"):
        read_layout("kangaroo-relased")
    broken = tmp_path / "mine.yaml"
    broken.write_text("name: mine\nrules: [{from: 'model\\.(.*'}]\n")  # no `to`, and an unclosed group
    with pytest.raises(ValueError, match="mine.yaml: not a valid layout"):
        read_layout(str(broken))


def test_visual_tokens_must_be_special_tokens_of_the_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from kangaroo.modules.sizes import TINY_VISUAL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    check_visual_tokens(tokenizer, TINY_VISUAL_TOKENS)  # the tiny model's own: accepted
    with pytest.raises(ValueError, match=r"placeholder 40: '.*', an ordinary token.*vi_end 5000: past the tokenizer"):
        check_visual_tokens(tokenizer, VisualTokens(placeholder=40, vi_start=41, eof=42, eov=43, vi_end=5000))
