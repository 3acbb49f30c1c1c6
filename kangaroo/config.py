"""Reading stage files (the LightningCLI YAML of ``kangaroo fit``) outside a fit."""

from __future__ import annotations

from typing import Any

import yaml


def load_stage_file(path: str, sections: tuple[str, ...] = ("model", "data")) -> dict[str, Any]:
    """Parses and instantiates the ``model`` (``KangarooStage``) and ``data``
    (``KangarooDataModule``) sections of a stage file, with the same checks as ``kangaroo fit``:
    an unknown or mistyped key is an error naming it and the file. Other sections (``trainer``)
    are left to the fit. Nothing is built: the stage builds its model in ``configure_model``."""
    from jsonargparse import ArgumentParser

    from kangaroo.data.datamodule import KangarooDataModule
    from kangaroo.modules.stage import KangarooStage

    classes = {"model": KangarooStage, "data": KangarooDataModule}
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ValueError(f"cannot read stage file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a stage file is a mapping with model/data/trainer sections")
    parser = ArgumentParser(exit_on_error=False)
    for name in sections:
        if name not in raw:
            raise ValueError(f"{path}: no `{name}:` section")
        parser.add_class_arguments(classes[name], name)
    try:
        cfg = parser.parse_object({name: raw[name] for name in sections})
        instantiated = parser.instantiate(cfg)
    except Exception as err:  # jsonargparse and the classes' own checks raise various types
        raise ValueError(f"{path}: {err}") from err
    return {name: instantiated[name] for name in sections}
