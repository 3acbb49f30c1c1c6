"""The language model: any causal LM from ``transformers``."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


@dataclass
class LanguageModelConfig:
    """The architecture is given inline (``transformers_config``) so that the model builds without
    any file; the weights come from ``pretrained`` only when they are loaded."""

    transformers_config: dict[str, Any] | None = None
    """The fields of the LLM's ``transformers`` config with a ``model_type`` (e.g. ``{"model_type": "llama",
    "hidden_size": 4096, ...}``). ``None``: read the config from ``pretrained``."""
    pretrained: str | None = None
    """A Hugging Face model id or a local directory (``save_pretrained`` layout)."""
    attn_implementation: str = "sdpa"
    """``sdpa`` (default; with packed rows transformers builds a dense block-diagonal mask from the
    restarting ``position_ids``), ``eager`` (the same mask), ``flex_attention`` (a document mask
    compiled on first use), or ``flash_attention_2`` (the ``gpu`` extra; rows go in as one
    sequence, see ``KangarooModel.hidden_states``). Each keeps packed samples apart."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: it runs arbitrary code."""
    torch_dtype: str | None = None
    """Weights dtype when loading pretrained weights (``bfloat16``, ``float32``); ``None``: float32."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for ``from_pretrained`` / ``from_config``."""

    def __post_init__(self) -> None:
        if self.transformers_config is None and self.pretrained is None:
            raise ValueError("language_model needs `transformers_config`, `pretrained`, or both")
        if self.transformers_config is not None and "model_type" not in self.transformers_config:
            raise ValueError(f"language_model.transformers_config needs a 'model_type' key, got keys {sorted(self.transformers_config)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"language_model.attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )


def build_language_model(config: LanguageModelConfig, load_weights: bool = False) -> nn.Module:
    """Builds an ``AutoModelForCausalLM`` on the current default device.

    With ``load_weights`` and a ``pretrained`` source the weights are read (safetensors);
    otherwise the model is randomly initialised from ``transformers_config``.
    """
    from transformers import AutoModelForCausalLM

    _check_attention(config.attn_implementation)
    common = dict(
        attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code,
        **config.extra,
    )
    if load_weights and config.pretrained:
        return _from_pretrained(config, common)
    model_config = resolve_llm_config(config)
    return AutoModelForCausalLM.from_config(model_config, **common)


def resolve_llm_config(config: LanguageModelConfig):
    """The ``transformers`` config object of the language model, from ``transformers_config`` or
    from ``pretrained`` (a local directory, or the hub cache)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if config.transformers_config is None:
        try:
            return AutoConfig.from_pretrained(config.pretrained, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not read a language model config from {config.pretrained!r}: {err}") from err
    fields = dict(config.transformers_config)
    model_type = fields.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown language model type {model_type!r} in language_model.transformers_config")
    return CONFIG_MAPPING[model_type](**fields)


def _from_pretrained(config: LanguageModelConfig, common: dict[str, Any]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.torch_dtype) if config.torch_dtype else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(config.pretrained, dtype=dtype, use_safetensors=True, **common)
    except (OSError, ValueError) as err:
        where = "local directory" if os.path.isdir(config.pretrained) else "model id or directory"
        raise ValueError(f"could not load language model weights from {where} {config.pretrained!r}: {err}") from err
    if config.transformers_config is not None:
        _check_matches_architecture(model.config, config.transformers_config, config.pretrained)
    return model


def _check_matches_architecture(loaded, fields: dict[str, Any], source: str) -> None:
    """An inline ``transformers_config`` next to pretrained weights must describe those weights."""
    shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    mismatched = {
        key: (fields[key], getattr(loaded, key, None))
        for key in shape_keys
        if key in fields and fields[key] != getattr(loaded, key, None)
    }
    if mismatched:
        details = ", ".join(f"{k}: config {a} vs weights {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"language model weights at {source!r} do not match language_model.transformers_config ({details})")


def _check_attention(implementation: str) -> None:
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs flash-attn, which is not installed "
            "(pip install 'kangaroo[gpu]'); use 'sdpa' otherwise"
        )
