import importlib.util

import pytest
import torch

from kangaroo.modules import LanguageModelConfig, build_language_model
from kangaroo.modules.sizes import TINY_LLAMA


def test_builds_from_inline_architecture_with_sdpa():
    model = build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA)))
    assert model.config.hidden_size == 128 and model.config._attn_implementation == "sdpa"


def test_loads_weights_from_a_local_directory(tmp_path):
    torch.manual_seed(0)
    source = build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA)))
    source.save_pretrained(tmp_path)
    loaded = build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA), pretrained=str(tmp_path)),
                                  load_weights=True)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # Without load_weights the same config gives a fresh random model.
    fresh = build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA), pretrained=str(tmp_path)))
    assert not torch.equal(fresh.lm_head.weight, source.lm_head.weight)
    # The config alone can come from the directory too.
    from_dir = build_language_model(LanguageModelConfig(pretrained=str(tmp_path)))
    assert from_dir.config.num_hidden_layers == TINY_LLAMA["num_hidden_layers"]


def test_weights_that_do_not_match_the_architecture(tmp_path):
    build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA))).save_pretrained(tmp_path)
    wider = dict(TINY_LLAMA, hidden_size=256)
    with pytest.raises(ValueError, match="hidden_size: config 256 vs weights 128"):
        build_language_model(LanguageModelConfig(transformers_config=wider, pretrained=str(tmp_path)), load_weights=True)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unknown language model type 'llama99'"):
        build_language_model(LanguageModelConfig(transformers_config={"model_type": "llama99"}))


def test_unknown_pretrained_source_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA), pretrained=missing), load_weights=True)
    with pytest.raises(ValueError, match="no-such-model"):
        build_language_model(LanguageModelConfig(pretrained=missing))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_flash_attn_is_a_clear_error():
    config = LanguageModelConfig(transformers_config=dict(TINY_LLAMA), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="needs flash-attn"):
        build_language_model(config)


def test_config_validation():
    with pytest.raises(ValueError, match="attn_implementation"):
        LanguageModelConfig(transformers_config=dict(TINY_LLAMA), attn_implementation="flash")
    with pytest.raises(ValueError, match="model_type"):
        LanguageModelConfig(transformers_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="transformers_config"):
        LanguageModelConfig()


def test_auto_attention_is_sdpa_without_a_gpu_and_flash_attention_with_one(monkeypatch):
    from kangaroo.modules.language_model import resolve_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build_language_model(LanguageModelConfig(transformers_config=dict(TINY_LLAMA), attn_implementation="auto"))
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "flash_attn" else None)
    assert resolve_attention("auto") == "flash_attention_2"
    assert resolve_attention("eager") == "eager", "a named implementation is kept"


def test_a_rope_override_keeps_the_base_models_rope_theta(tmp_path):
    """Llama-3 pre-trained with rope_theta 500,000: a stage's rope_scaling without a theta must not
    fall back to transformers' default of 10,000 (inline v4 and v5 configs, and a pretrained one)."""
    from kangaroo.modules.language_model import resolve_llm_config

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    overrides = {"max_position_embeddings": 32768, "rope_scaling": scaling}
    v4 = {**TINY_LLAMA, "rope_theta": 500000.0}
    v5 = {k: v for k, v in TINY_LLAMA.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    build_language_model(LanguageModelConfig(transformers_config=v4)).save_pretrained(tmp_path)
    for config in (LanguageModelConfig(transformers_config=v4), LanguageModelConfig(transformers_config=v5),
                   LanguageModelConfig(pretrained=str(tmp_path))):
        resolved = resolve_llm_config(config, overrides)
        assert resolved.rope_parameters["rope_type"] == "llama3" and resolved.max_position_embeddings == 32768
        assert resolved.rope_parameters["rope_theta"] == 500000.0, config
    assert "rope_theta" not in scaling, "the caller's override is left as it was"
    loaded = build_language_model(LanguageModelConfig(pretrained=str(tmp_path)), load_weights=True, overrides=overrides)
    assert loaded.config.rope_parameters["rope_theta"] == 500000.0
