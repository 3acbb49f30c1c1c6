"""The language model: any causal LM from ``transformers``."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")


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
    compiled on first use), ``flash_attention_2`` (the ``gpu`` extra; rows go in as one
    sequence, see ``KangarooModel.hidden_states``), or ``auto``: ``flash_attention_2`` on a GPU
    where flash-attn is installed, else ``sdpa`` (the 8B configs: their cost then follows the
    samples, not the row). Each keeps packed samples apart."""
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


def build_language_model(config: LanguageModelConfig, load_weights: bool = False,
                         overrides: dict[str, Any] | None = None) -> nn.Module:
    """Builds an ``AutoModelForCausalLM`` on the current default device.

    With ``load_weights`` and a ``pretrained`` source the weights are read (safetensors);
    otherwise the model is randomly initialised from ``transformers_config``. ``overrides``:
    config fields set over either (``KangarooConfig.language_model_overrides``).
    """
    from transformers import AutoModelForCausalLM

    implementation = resolve_attention(config.attn_implementation)
    _check_attention(implementation)
    common = dict(
        attn_implementation=implementation,
        trust_remote_code=config.trust_remote_code,
        **config.extra,
    )
    if load_weights and config.pretrained:
        return _from_pretrained(config, common, overrides)
    model_config = resolve_llm_config(config, overrides)
    return AutoModelForCausalLM.from_config(model_config, **common)


def resolve_llm_config(config: LanguageModelConfig, overrides: dict[str, Any] | None = None):
    """The ``transformers`` config object of the language model, from ``transformers_config`` or
    from ``pretrained`` (a local directory, or the hub cache), with ``overrides`` set over it
    (passed to the config's constructor, which checks them: ``rope_scaling`` among others)."""
    from transformers import CONFIG_MAPPING

    overrides = copy.deepcopy(dict(overrides or {}))  # the constructor writes into what it is given
    if "model_type" in overrides:
        raise ValueError("language_model_overrides cannot change the model_type")
    if config.transformers_config is None:
        return _pretrained_config(config, overrides)
    fields = copy.deepcopy(dict(config.transformers_config))
    model_type = fields.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown language model type {model_type!r} in language_model.transformers_config")
    if overrides:
        _keep_rope_theta(overrides, CONFIG_MAPPING[model_type](**copy.deepcopy(fields)))
    return CONFIG_MAPPING[model_type](**{**fields, **overrides})


def _keep_rope_theta(overrides: dict[str, Any], base) -> None:
    """A RoPE scaling override (``rope_scaling`` or ``rope_parameters``) without a ``rope_theta``
    keeps the base model's: transformers would otherwise fall back to its default of 10,000, or
    to none, for a model pre-trained with another base (Llama-3: 500,000)."""
    theta = _rope_theta(base)
    for key in ("rope_scaling", "rope_parameters"):
        rope = overrides.get(key)
        if isinstance(rope, dict) and "rope_theta" not in rope and "rope_theta" not in overrides and theta is not None:
            rope["rope_theta"] = theta


def _rope_theta(llm_config) -> float | None:
    rope = getattr(llm_config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        return rope["rope_theta"]
    return getattr(llm_config, "rope_theta", None)


def _pretrained_config(config: LanguageModelConfig, overrides: dict[str, Any]):
    from transformers import AutoConfig

    try:
        if overrides:
            base = AutoConfig.from_pretrained(config.pretrained, trust_remote_code=config.trust_remote_code)
            _keep_rope_theta(overrides, base)
        return AutoConfig.from_pretrained(config.pretrained, trust_remote_code=config.trust_remote_code, **overrides)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read a language model config from {config.pretrained!r}: {err}") from err


def _from_pretrained(config: LanguageModelConfig, common: dict[str, Any],
                     overrides: dict[str, Any] | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.torch_dtype) if config.torch_dtype else torch.float32
    if overrides:
        common = {**common, "config": _pretrained_config(config, copy.deepcopy(dict(overrides)))}
    try:
        model = AutoModelForCausalLM.from_pretrained(config.pretrained, dtype=dtype, use_safetensors=True, **common)
    except (OSError, ValueError) as err:
        where = "local directory" if os.path.isdir(config.pretrained) else "model id or directory"
        raise ValueError(f"could not load language model weights from {where} {config.pretrained!r}: {err}") from err
    if config.transformers_config is not None:
        _check_matches_architecture(model.config, config.transformers_config, config.pretrained)
    return model


def position_limit(llm_config) -> tuple[int, str]:
    """``(max_position_embeddings, how the RoPE is set)`` of a ``transformers`` config: the
    longest sample, in positions, a stage may train this model on."""
    rope = getattr(llm_config, "rope_parameters", None) or getattr(llm_config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    theta = rope.get("rope_theta", getattr(llm_config, "rope_theta", None)) if isinstance(rope, dict) else None
    described = f"rope_type {kind}" + (f", rope_theta {theta:g}" if theta is not None else "")
    if isinstance(rope, dict) and "factor" in rope:
        described += f", factor {rope['factor']:g}"
    return int(llm_config.max_position_embeddings), described


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


def resolve_attention(implementation: str, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> str:
    """The implementation ``implementation`` stands for where the model runs (see
    ``LanguageModelConfig.attn_implementation``).

    ``device`` and ``dtype``: those of a load (``kangaroo.inference.load_pretrained``); ``None``
    means a training run, which places the model on a GPU when there is one and computes in that
    run's dtype. ``flash_attention_2`` needs CUDA, flash-attn and 16-bit weights: ``auto`` takes it
    only then, and a stored ``flash_attention_2`` falls back to ``sdpa`` (with a warning) on a load
    that cannot run it (a model folder trained on GPUs and asked about on a CPU)."""
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if device is None:
        on_gpu, half = torch.cuda.is_available(), True
    else:
        on_gpu = torch.device(device).type == "cuda"
        half = dtype in (torch.bfloat16, torch.float16)
    flash_runs = on_gpu and half and flash_installed
    if implementation == "flash_attention_2" and device is not None and not flash_runs:
        log.warning("attn_implementation flash_attention_2 cannot run on %s in %s%s: using sdpa", device,
                    str(dtype or torch.float32).removeprefix("torch."), "" if flash_installed else " (flash-attn is not installed)")
        return "sdpa"
    if implementation != "auto":
        return implementation
    if flash_runs:
        return "flash_attention_2"
    if on_gpu and not flash_installed:
        log.warning("attn_implementation auto: flash-attn is not installed, so packed rows get sdpa with a dense "
                    "S x S mask (0.5 GB at 22,528 tokens) and dense attention work; pip install 'kangaroo[gpu]'")
    return "sdpa"


def _check_attention(implementation: str) -> None:
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs flash-attn, which is not installed "
            "(pip install 'kangaroo[gpu]'); use 'sdpa' otherwise"
        )
