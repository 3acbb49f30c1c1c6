"""Reading stage files (the LightningCLI YAML of ``kangaroo fit``) outside a fit.

A stage file may name another YAML file where a section of the model goes (``language_model:
language-model.yaml``, relative to the stage file): jsonargparse reads such a file in place of
the value during ``kangaroo fit``, so each model's shared parts are written once. Readers of the
raw YAML (the recipe runner merges overrides into it) get the same mapping from
``read_stage_yaml``, which inlines those files the same way.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

CONFIG_SUFFIXES = (".yaml", ".yml")


def read_stage_yaml(path: str) -> dict[str, Any]:
    """The stage file ``path`` as a mapping, every file it names under ``model:`` and ``data:``
    (a string value ending in ``.yaml``) read in place, relative to the file naming it."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a stage file is a mapping with model/data/trainer sections")
    for section in ("model", "data"):
        if section in raw:
            raw[section] = _inline(raw[section], os.path.dirname(os.path.abspath(path)), f"{path}: {section}")
    return raw


def _inline(value: Any, base: str, where: str) -> Any:
    # jsonargparse does this itself inside a parse; the raw mapping needs it done by hand
    if isinstance(value, dict):
        return {key: _inline(item, base, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, str) and value.endswith(CONFIG_SUFFIXES):
        included = value if os.path.isabs(value) else os.path.join(base, value)
        if not os.path.isfile(included):
            raise ValueError(f"{where} names the config file {value}, which does not exist ({included})")
        return _inline(_read_yaml(included), os.path.dirname(included), f"{where} ({value})")
    return value


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or {}
    except OSError as err:
        raise ValueError(f"cannot read stage file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err


def load_stage_file(path: str, sections: tuple[str, ...] = ("model", "data")) -> dict[str, Any]:
    """Parses and instantiates the ``model`` (``KangarooStage``) and ``data``
    (``KangarooDataModule``) sections of a stage file, with the same checks as ``kangaroo fit``:
    an unknown or mistyped key is an error naming it and the file. Other sections (``trainer``)
    are left to the fit. Nothing is built: the stage builds its model in ``configure_model``."""
    from jsonargparse import ArgumentParser

    from kangaroo.data.datamodule import KangarooDataModule
    from kangaroo.training.stage import KangarooStage

    classes = {"model": KangarooStage, "data": KangarooDataModule}
    raw = read_stage_yaml(path)
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
