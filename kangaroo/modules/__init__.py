"""Model parts of Kangaroo; each is usable alone and composed by ``KangarooModel``. Nothing
here trains: the stage module, optimizer groups, freezing and weight I/O live in
``kangaroo.training``. ``layout`` describes the visual tokens without a model, for data code."""

from kangaroo.modules.builder import KangarooConfig, build_kangaroo, visual_layout
from kangaroo.modules.language_model import LanguageModelConfig, build_language_model
from kangaroo.modules.layout import IGNORE_INDEX, VisualLayout, VisualTokens
from kangaroo.modules.loss import labelled_token_loss
from kangaroo.modules.model import PART_NAMES, KangarooModel, KangarooOutput
from kangaroo.modules.patchify import PatchifyConfig, SpatialTemporalPatchify
from kangaroo.modules.projector import ProjectorConfig, build_projector
from kangaroo.modules.sizes import (
    MODEL_SIZES,
    kangaroo_8b,
    kangaroo_8b_config,
    kangaroo_tiny,
    kangaroo_tiny_config,
    named_config,
)
from kangaroo.modules.temporal_embedding import TemporalPositionEmbedding
from kangaroo.modules.vision_tower import VisionTower, VisionTowerConfig, build_vision_tower

__all__ = [
    "IGNORE_INDEX",
    "MODEL_SIZES",
    "PART_NAMES",
    "KangarooConfig",
    "KangarooModel",
    "KangarooOutput",
    "LanguageModelConfig",
    "PatchifyConfig",
    "ProjectorConfig",
    "SpatialTemporalPatchify",
    "TemporalPositionEmbedding",
    "VisionTower",
    "VisionTowerConfig",
    "VisualLayout",
    "VisualTokens",
    "build_kangaroo",
    "build_language_model",
    "build_projector",
    "build_vision_tower",
    "kangaroo_8b",
    "kangaroo_8b_config",
    "kangaroo_tiny",
    "kangaroo_tiny_config",
    "labelled_token_loss",
    "named_config",
    "visual_layout",
]
