"""KangarooConfig, the full description of a model, and the builder that takes every part of it."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

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
    language_model_overrides: dict | None = None
    """Fields of the LLM's ``transformers`` config this model changes, applied over
    ``language_model`` (inline or pretrained), e.g. stage 5's ``max_position_embeddings`` and
    ``rope_scaling`` for rows of 22,528 positions. A sibling of ``language_model`` so that a
    stage file naming its model's shared ``architecture.yaml`` can still state them."""

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be positive, got {self.loss_chunk_size}")


SKELETON_PARTS = ("vision_tower", "language_model")
"""The parts ``build_kangaroo(skeleton=True)`` builds without parameter memory: the big ones."""


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) while their
    buffers are real: the RoPE frequencies and other non-persistent buffers, which no weights
    file holds, keep the values their constructors computed. (accelerate's
    ``init_empty_weights(include_buffers=False)`` does the same; it is not a dependency here.)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_kangaroo(config: KangarooConfig, load_weights: bool = False, skeleton: bool = False) -> KangarooModel:
    """Builds every part on the current default device (``torch.device('meta')`` builds the 8B
    model in seconds). Pretrained weights are read only with ``load_weights``.

    ``skeleton``: the vision tower and the LLM get their parameters on the meta device (buffers
    real, see ``parameters_on_meta``), to be sharded and then filled from a weights file
    (``kangaroo.training.fsdp.materialize``); the small parts are built whole."""
    if skeleton and load_weights:
        raise ValueError("a skeleton build has no parameters to read pretrained weights into")
    with parameters_on_meta() if skeleton else nullcontext():
        vision = build_vision_tower(config.vision_tower, load_weights)
        llm = build_language_model(config.language_model, load_weights, config.language_model_overrides)
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
