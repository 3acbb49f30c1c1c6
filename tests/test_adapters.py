"""LoRA adapters on a part (kangaroo.modules.adapters, through peft): what they wrap, what
trains, the merged weights, and the declarations refused before anything trains."""

from __future__ import annotations

import pytest
import torch

from conftest import collate, make_sample
from kangaroo.modules import kangaroo_tiny
from kangaroo.modules.adapters import AdapterConfig, add_adapters, merged_state_dict
from kangaroo.training.freezing import apply_trainable

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(adapters: dict[str, AdapterConfig], seed: int = 0):
    torch.manual_seed(seed)
    model = kangaroo_tiny().eval()
    add_adapters(model, adapters)
    for name, parameter in model.named_parameters():  # peft starts B at zero: an untrained adapter adds nothing
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_merged_weights_give_the_adapter_models_logits_under_the_plain_names():
    adapters = {"language_model": AdapterConfig(r=4, alpha=8, target_modules=ALL_LINEAR),
                "vision_tower": AdapterConfig(r=2, alpha=8, target_modules=["proj", "fc1", "fc2"])}
    model = adapted(adapters)
    batch = collate([make_sample(model, 4, 6, seed=1), make_sample(model, 2, 3, seed=2)])
    with torch.no_grad():
        expected = model(**batch, return_logits=True).logits
        merged = merged_state_dict(model.state_dict(), adapters)  # each part at its own scale, alpha / r
        plain = kangaroo_tiny().eval()
        plain.load_state_dict(merged, strict=True)  # every name of a model without adapters, nothing more
        got = plain(**batch, return_logits=True).logits
        torch.manual_seed(0)
        base = kangaroo_tiny().eval()  # the model the adapters were added to, as built
        without = base(**batch, return_logits=True).logits
    # float32 sums in another order: a few ulps of logits of order 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (without - expected).abs().max() > 1e-2, "the adapters changed the model (so the check above means something)"


def test_only_adapters_train_in_a_part_that_has_them_and_the_table_shows_them_apart():
    model = adapted({"language_model": AdapterConfig(r=8, target_modules=["q_proj", "v_proj"])})
    rows = {row["part"]: row for row in apply_trainable(
        model, {"vision_tower": False, "patchify": True, "projector": True, "language_model": False})}
    llm = model.language_model.config
    layers, hidden = llm.num_hidden_layers, llm.hidden_size
    kv = llm.num_key_value_heads * (hidden // llm.num_attention_heads)
    expected = layers * 8 * ((hidden + hidden) + (hidden + kv))  # A (r x in) and B (out x r) of q and v
    assert rows["language_model adapters"] == {"part": "language_model adapters", "params": expected, "trainable": expected}
    assert rows["language_model"]["trainable"] == 0 and rows["language_model"]["params"] > expected
    assert rows["vision_tower"]["trainable"] == 0 and "vision_tower adapters" not in rows
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith(("patchify.", "projector.")) for n in trained)


@pytest.mark.parametrize("adapters, message", [
    ({"language_model": AdapterConfig(target_modules=["q_proj", "qkv"])},
     r"\['qkv'\] name no linear layer of language_model; its linear layers are \['down_proj', 'gate_proj', 'k_proj'"),
    ({"vision_tower": AdapterConfig(target_modules=["qkv"])}, r"\['qkv'\] of vision_tower are applied through their weight"),
    ({"temporal_embedding": AdapterConfig()}, "no linear layer"),
])
def test_targets_that_would_adapt_nothing_are_refused_naming_them(adapters, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(kangaroo_tiny(), adapters)


def test_a_stage_refuses_adapters_on_a_part_it_also_trains_whole_or_an_unknown_part():
    from kangaroo.modules import kangaroo_tiny_config
    from kangaroo.training.stage import KangarooStage

    trainable = {"vision_tower": False, "patchify": True, "projector": True, "language_model": True}
    with pytest.raises(ValueError, match=r"adapters on \['language_model'\], which `trainable` also trains whole"):
        KangarooStage(kangaroo_tiny_config(), trainable, adapters={"language_model": AdapterConfig()})
    with pytest.raises(ValueError, match=r"adapters: unknown part\(s\) \['llm'\]"):
        KangarooStage(kangaroo_tiny_config(), trainable, adapters={"llm": AdapterConfig()})
    with pytest.raises(ValueError, match="kind must be 'lora' or 'qlora'"):
        AdapterConfig(kind="ia3")


def test_a_4bit_base_is_refused_without_a_cuda_device():
    from kangaroo.modules import kangaroo_tiny_config
    from kangaroo.training.stage import KangarooStage

    stage = KangarooStage(kangaroo_tiny_config(), {"vision_tower": False, "patchify": True, "projector": True,
                                                   "language_model": False},
                          adapters={"language_model": AdapterConfig(kind="qlora", r=2, target_modules=["v_proj"])})
    with pytest.raises(ValueError, match=r"adapters on \['language_model'\] are kind: qlora.*need a CUDA device; "
                                         "this run is on cpu"):
        stage.configure_model()
    assert stage.model is None


def test_only_linear_layers_are_wrapped_and_patterns_may_still_freeze_adapters():
    model = adapted({"vision_tower": AdapterConfig(r=2, target_modules=["proj"])})
    wrapped = {n.rsplit(".", 1)[0] for n, _ in model.vision_tower.named_parameters() if "lora_A" in n}
    assert wrapped and all(name.split(".lora_A")[0].endswith("attn.proj") for name in wrapped), "the patch embedding's conv is a `proj` too"
    apply_trainable(model, {"vision_tower": False, "patchify": True, "projector": True, "language_model": False},
                    {"vision_tower.*.blocks.0.*lora_*": False})
    frozen = [n for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
    assert frozen and all(".blocks.0." in n for n in frozen)


def test_a_checkpoint_without_the_stages_adapters_is_refused_on_load():
    from kangaroo.modules import kangaroo_tiny_config
    from kangaroo.training.stage import KangarooStage

    stage = KangarooStage(kangaroo_tiny_config(), {"vision_tower": False, "patchify": True, "projector": True,
                                                   "language_model": False},
                          adapters={"language_model": AdapterConfig(r=2, target_modules=["v_proj"])})
    stage.configure_model()
    saved = {f"model.{n}": p.detach() for n, p in stage.model.named_parameters() if p.requires_grad}
    stage.on_load_checkpoint({"state_dict": saved})  # what its own on_save_checkpoint keeps: accepted
    renamed = {k.replace("v_proj", "k_proj"): v for k, v in saved.items()}  # other targets, same shapes
    with pytest.raises(ValueError, match=r"does not match this stage's adapters: missing \['model.language_model"):
        stage.on_load_checkpoint({"state_dict": renamed})
