"""Named model sizes: literal numbers only; the building is done by ``build_kangaroo``."""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict
from typing import Any, Callable

from kangaroo.modules.builder import KangarooConfig, build_kangaroo
from kangaroo.modules.language_model import LanguageModelConfig
from kangaroo.modules.layout import VisualTokens
from kangaroo.modules.model import KangarooModel
from kangaroo.modules.patchify import PatchifyConfig
from kangaroo.modules.projector import ProjectorConfig
from kangaroo.modules.vision_tower import VisionTowerConfig

LLAMA3_8B_INSTRUCT = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "tie_word_embeddings": False,
}

# Llama-3 reserves special tokens 128002-128255; <|reserved_special_token_5|> .. _9|> carry the
# visual layout, so the vocabulary (and the released 128,256-row embedding) keeps its size.
LLAMA3_VISUAL_TOKENS = VisualTokens(placeholder=128010, vi_start=128011, eof=128012, eov=128013, vi_end=128014)

TINY_VOCAB = 1024
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": TINY_VOCAB,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
TINY_VISUAL_TOKENS = VisualTokens(*range(TINY_VOCAB - 5, TINY_VOCAB))
# Each model's parts as a stage file writes them under model.architecture: configs/<model>/architecture.yaml
# names one of these (`size: kangaroo-tiny`) and adds only what is not a size (weights to read, kernels),
# so the numbers live here alone; `kangaroo fit --print_config` shows them in the stage.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "kangaroo-8b": {
        "vision_tower": {"name": "EVA02-L-14", "image_size": 448, "pretrained": "merged2b_s4b_b131k", "drop_path": 0.0},
        "language_model": {"pretrained": "meta-llama/Meta-Llama-3-8B-Instruct",
                           "transformers_config": LLAMA3_8B_INSTRUCT},
        "visual_tokens": asdict(LLAMA3_VISUAL_TOKENS),
        "patchify": {"kernel": [2, 2, 2], "init": "uniform"},
        "projector": {"kind": "linear"},
    },
    "kangaroo-tiny": {  # timm's EVA02-tiny cut to 4 blocks at 112 px, and the 4-layer Llama
        "vision_tower": {"name": "timm:eva02_tiny_patch14_224", "image_size": 112, "drop_path": 0.0,
                         "timm_kwargs": {"depth": 4, "global_pool": "token"}},
        "language_model": {"transformers_config": TINY_LLAMA},
        "visual_tokens": asdict(TINY_VISUAL_TOKENS),
        "patchify": {"kernel": [2, 2, 2], "init": "uniform"},
        "projector": {"kind": "linear"},
    },
}


def architecture(name: str) -> dict[str, Any]:
    """The named model's parts as a stage file's ``model.architecture`` mapping (a deep copy)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model size {name!r}; known: {sorted(ARCHITECTURES)}")
    return copy.deepcopy(ARCHITECTURES[name])


def _config(name: str, image_size: int | None = None, patchify: bool = True) -> KangarooConfig:
    parts = architecture(name)
    return KangarooConfig(
        vision_tower=VisionTowerConfig(**{**parts["vision_tower"], **({"image_size": image_size} if image_size else {})}),
        language_model=LanguageModelConfig(**parts["language_model"]),
        visual_tokens=VisualTokens(**parts["visual_tokens"]),
        patchify=PatchifyConfig(kernel=tuple(parts["patchify"]["kernel"]), init=parts["patchify"]["init"])
        if patchify else None,
        projector=ProjectorConfig(**parts["projector"]),
    )


def kangaroo_8b_config(image_size: int | None = None, patchify: bool = True) -> KangarooConfig:
    """EVA02-CLIP-L/14 + Llama-3-8B-Instruct. Stages 1-2: ``image_size=224, patchify=False``;
    stages 3-5: the defaults (448 px, patchify)."""
    return _config("kangaroo-8b", image_size, patchify)


def kangaroo_tiny_config(image_size: int | None = None, patchify: bool = True) -> KangarooConfig:
    """A 4-block timm EVA02-tiny tower and a 4-layer Llama, the model of the tiny recipe: the same
    code at CPU scale. Stages 1-2: ``image_size=56, patchify=False``; stages 3-5: the defaults
    (112 px, patchify)."""
    return _config("kangaroo-tiny", image_size, patchify)


def kangaroo_8b(image_size: int | None = None, patchify: bool = True, load_weights: bool = False) -> KangarooModel:
    return build_kangaroo(kangaroo_8b_config(image_size, patchify), load_weights)


def kangaroo_tiny(image_size: int | None = None, patchify: bool = True, load_weights: bool = False) -> KangarooModel:
    return build_kangaroo(kangaroo_tiny_config(image_size, patchify), load_weights)


MODEL_SIZES: dict[str, Callable[..., KangarooConfig]] = {
    name: functools.partial(_config, name) for name in ARCHITECTURES
}


def named_config(name: str, **overrides) -> KangarooConfig:
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_SIZES)}")
    return MODEL_SIZES[name](**overrides)
