"""KangarooConfig, the full description of a model, and the builder that takes every part of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kangaroo.modules.language_model import LanguageModelConfig, build_language_model
from kangaroo.modules.layout import VisualLayout, VisualTokens
from kangaroo.modules.model import KangarooModel
from kangaroo.modules.patchify import PatchifyConfig, SpatialTemporalPatchify
from kangaroo.modules.projector import ProjectorConfig, build_projector
from kangaroo.modules.temporal_embedding import TemporalPositionEmbedding
from kangaroo.modules.vision_tower import VisionTowerConfig, build_vision_tower


@dataclass
class KangarooConfig:
    """Every choice that shapes a Kangaroo model. Named sizes live in ``kangaroo.modules.sizes``."""

    vision_tower: VisionTowerConfig
    language_model: LanguageModelConfig
    visual_tokens: VisualTokens
    """Ids of ``<image>``, ``<vi_start>``, ``<eof>``, ``<eov>``, ``<vi_end>`` in the LLM vocabulary."""
    patchify: PatchifyConfig | None = None
    """``None`` in stages 1-2; the 3D depthwise convolution from stage 3 on."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    temporal_theta: float = 10000.0
    """Base of the sinusoidal temporal position embedding (paper eq. 3)."""
    loss_chunk_size: int = 1024
    """Labelled tokens per chunk of the output head in the loss (bounds logits memory)."""

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be positive, got {self.loss_chunk_size}")


def build_kangaroo(config: KangarooConfig, load_weights: bool = False) -> KangarooModel:
    """Builds every part on the current default device (``torch.device('meta')`` builds the 8B
    model in seconds). Pretrained weights are read only with ``load_weights``."""
    vision = build_vision_tower(config.vision_tower, load_weights)
    llm = build_language_model(config.language_model, load_weights)
    llm_width = llm.get_input_embeddings().embedding_dim
    return KangarooModel(
        vision_tower=vision,
        temporal_embedding=TemporalPositionEmbedding(vision.width, config.temporal_theta),
        patchify=SpatialTemporalPatchify(vision.width, config.patchify) if config.patchify else None,
        projector=build_projector(vision.width, llm_width, config.projector),
        language_model=llm,
        visual_tokens=config.visual_tokens,
        loss_chunk_size=config.loss_chunk_size,
    )


def visual_layout(config: KangarooConfig) -> VisualLayout:
    """The visual token layout a model of ``config`` has, read from its vision tower built on the
    meta device (no memory, no weights): what data preparation needs of the model."""
    with torch.device("meta"):
        tower = build_vision_tower(config.vision_tower)
    kernel = config.patchify.kernel if config.patchify is not None else None
    return VisualLayout(tower.image_size, tower.grid, kernel, config.visual_tokens)
