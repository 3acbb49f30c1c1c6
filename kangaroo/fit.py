"""``kangaroo fit``: LightningCLI over one stage module and one stage data module."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from kangaroo.data.datamodule import KangarooDataModule
from kangaroo.modules.stage import KangarooStage


class KangarooCLI(LightningCLI):
    """LightningCLI bound to ``KangarooStage`` and ``KangarooDataModule`` (no subclass mode: the
    YAML holds their arguments directly under ``model:`` and ``data:``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(KangarooStage, KangarooDataModule, args=args, run=run, **kwargs)

