"""The vision encoder: an EVA02 ViT from open_clip (or a bare timm model) returning patch tokens."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TIMM_PREFIX = "timm:"


@dataclass
class VisionTowerConfig:
    """Which ViT to build, at which resolution, with which weights."""

    name: str = "EVA02-L-14"
    """An open_clip model name (``EVA02-L-14``, ``EVA02-B-16``, ...), whose timm trunk is kept, or
    ``timm:<model>`` for a bare timm model (``timm:eva02_tiny_patch14_224`` for the tiny model)."""
    image_size: int = 448
    """Input resolution in pixels (square). Position and RoPE tables are interpolated to it."""
    pretrained: str | None = None
    """open_clip names: an open_clip tag (``merged2b_s4b_b131k``) or a local open_clip checkpoint.
    timm names: a local weights file (safetensors or a ``torch.save``'d state dict). ``None``:
    random init. Only read when weights are loaded."""
    drop_path: float = 0.0
    """Stochastic depth rate (the paper uses 0)."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (``timm:`` names only), e.g. ``depth``."""

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"vision_tower.image_size must be positive, got {self.image_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"vision_tower.drop_path must be in [0, 1), got {self.drop_path}")
        if self.timm_kwargs and not self.name.startswith(TIMM_PREFIX):
            raise ValueError(f"vision_tower.timm_kwargs only applies to 'timm:' names, got name {self.name!r}")


class VisionTower(nn.Module):
    """Wraps a timm ViT trunk; ``forward`` returns patch tokens without the class token.

    ``trunk`` is kept under that name so that checkpoints of the tower read ``trunk.*`` exactly
    like open_clip's ``visual.trunk.*``.
    """

    def __init__(self, trunk: nn.Module, image_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.image_size = image_size
        self.patch_size = int(trunk.patch_embed.patch_size[0])
        self.width = int(trunk.embed_dim)
        self.grid = (image_size // self.patch_size, image_size // self.patch_size)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: ``(n, 3, H, W)`` normalised frames. Returns ``(n, h*w, width)`` patch tokens."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vision tower expects {self.image_size}x{self.image_size} frames, got {tuple(pixels.shape[-2:])}"
            )
        tokens = self.trunk.forward_features(pixels)
        prefix = self.trunk.num_prefix_tokens
        # a fresh tensor, not a view: a sharded (FSDP2) tower's backward hook sits on its output
        return tokens[:, prefix:].clone(memory_format=torch.contiguous_format) if prefix else tokens


def build_vision_tower(config: VisionTowerConfig, load_weights: bool = False) -> VisionTower:
    """Builds the tower on the current default device; weights are read only if ``load_weights``."""
    check_vision_resolution(config)
    if config.name.startswith(TIMM_PREFIX):
        trunk = _build_timm_trunk(config, load_weights)
    else:
        trunk = _build_open_clip_trunk(config, load_weights)
    trunk.reset_classifier(0)
    return VisionTower(trunk, config.image_size)


def check_vision_resolution(config: VisionTowerConfig) -> int:
    """Returns the patch size; raises if the name is unknown or the patch size does not divide
    the resolution. Builds nothing but a meta-device shell of the trunk."""
    import timm

    timm_name = _timm_name(config.name)
    with torch.device("meta"):
        shell = timm.create_model(timm_name, pretrained=False, num_classes=0)
    patch = int(shell.patch_embed.patch_size[0])
    if config.image_size % patch:
        raise ValueError(
            f"vision_tower.image_size={config.image_size} is not a multiple of {config.name}'s patch size {patch}"
        )
    return patch


def _timm_name(name: str) -> str:
    import open_clip
    import timm

    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        if not timm.is_model(timm_name):
            raise ValueError(f"unknown timm vision model {timm_name!r} (vision_tower.name={name!r})")
        return timm_name
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        evas = [m for m in open_clip.list_models() if m.startswith("EVA")]
        raise ValueError(f"unknown open_clip vision model {name!r}; EVA models open_clip knows: {evas}")
    timm_name = model_cfg.get("vision_cfg", {}).get("timm_model_name")
    if timm_name is None:
        raise ValueError(f"open_clip model {name!r} has no timm trunk; use an EVA02 model such as 'EVA02-L-14'")
    return timm_name


def _build_open_clip_trunk(config: VisionTowerConfig, load_weights: bool) -> nn.Module:
    import open_clip

    pretrained = config.pretrained if load_weights else None
    quiet = _RandomInitNotice() if pretrained is None else contextlib.nullcontext()
    try:
        with quiet:
            clip = open_clip.create_model(
                config.name,
                pretrained=pretrained,
                force_image_size=config.image_size,
                force_patch_dropout=0.0,
                device=torch.get_default_device(),
                weights_only=True,
                **({"vision_cfg": _drop_path_override(config)} if config.drop_path else {}),
            )
    except RuntimeError as err:
        raise ValueError(
            f"could not load vision tower weights {pretrained!r} for {config.name!r}: {err}"
        ) from err
    return clip.visual.trunk


def _drop_path_override(config: VisionTowerConfig) -> dict[str, Any]:
    import open_clip

    # A `vision_cfg` keyword replaces open_clip's whole vision config, so it restates the size.
    vision_cfg = dict(open_clip.get_model_config(config.name)["vision_cfg"])
    vision_cfg.update(image_size=config.image_size, timm_drop_path=config.drop_path)
    return vision_cfg


def _build_timm_trunk(config: VisionTowerConfig, load_weights: bool) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(config.timm_kwargs)
    if load_weights and config.pretrained:
        if not os.path.isfile(config.pretrained):
            raise ValueError(f"vision_tower.pretrained file not found: {config.pretrained}")
        # timm's loader reads safetensors or weights_only pickles and resamples the position table.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": config.pretrained})
    return timm.create_model(
        config.name[len(TIMM_PREFIX) :],
        img_size=config.image_size,
        num_classes=0,
        drop_path_rate=config.drop_path,
        **kwargs,
    )


class _RandomInitNotice(logging.Filter, contextlib.AbstractContextManager):
    """Hides open_clip's "no pretrained weights loaded" warning when random init is what was asked
    for (summaries, meta-device builds, tests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)
