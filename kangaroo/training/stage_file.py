"""Reading stage files (the LightningCLI YAML of ``kangaroo fit``) outside a fit.

A stage file may name another YAML file where a section of the model goes (``architecture:
architecture.yaml``, relative to the stage file), read in place of the value, so each model's
shared parts are written once. A mapping may
also name a ``base:`` file and state only what differs from it::

    architecture:
      base: architecture.yaml          # the model's parts, written once for its five stages
      vision_tower: {image_size: 56}   # what this stage changes
      patchify: null

The base's mappings are merged key by key with the stage's (a stage's value replaces the base's,
``null`` included). A model's architecture file names its size (``size: kangaroo-tiny``): the
parts' numbers, kept in ``kangaroo.modules.sizes`` alone, stand in for that key and the file's
other keys are merged over them in the same way. Readers of the raw YAML (the recipe runner merges overrides into it) get the
whole mapping from ``read_stage_yaml``, which inlines those files and sizes; ``kangaroo fit``
hands jsonargparse that mapping for a stage file naming a base or an architecture file (``fit_arguments``), so
``--print_config`` shows the whole stage.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

CONFIG_SUFFIXES = (".yaml", ".yml")
BASE_KEY = "base"
SIZE_KEY = "size"


def read_stage_yaml(path: str) -> dict[str, Any]:
    """The stage file ``path`` as a mapping, every file it names under ``model:`` and ``data:``
    (a string value ending in ``.yaml``) read in place, relative to the file naming it."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a stage file is a mapping with model/data/trainer sections")
    for section in ("model", "data"):
        if section in raw:
            raw[section] = _inline(raw[section], os.path.dirname(os.path.abspath(path)), f"{path}: {section}",
                                   section=section)
    return raw


def _inline(value: Any, base: str, where: str, section: str = "", sized: bool = False) -> Any:
    """``value`` with the files it names read in place; ``section`` is set for a stage's
    ``model``/``data`` mapping itself, ``sized`` for its ``model.architecture`` (the one place a
    ``size:`` is read, so that no other key named ``size`` is taken for one)."""
    # jsonargparse does this itself inside a parse; the raw mapping needs it done by hand
    if isinstance(value, dict) and _is_file(value.get(BASE_KEY)):
        merged = _inline(value[BASE_KEY], base, f"{where}.{BASE_KEY}", section, sized)
        if not isinstance(merged, dict):
            raise ValueError(f"{where}.{BASE_KEY}: {value[BASE_KEY]} holds no mapping")
        changes = _inline({k: v for k, v in value.items() if k != BASE_KEY}, base, where, section, sized)
        return _merged(merged, changes)
    if sized and isinstance(value, dict) and isinstance(value.get(SIZE_KEY), str):
        from kangaroo.modules.sizes import architecture

        try:
            parts = architecture(value[SIZE_KEY])
        except ValueError as err:
            raise ValueError(f"{where}.{SIZE_KEY}: {err}") from None
        changes = _inline({k: v for k, v in value.items() if k != SIZE_KEY}, base, where)
        return _merged(parts, changes)
    if isinstance(value, dict):
        return {key: _inline(item, base, f"{where}.{key}", sized=section == "model" and key == "architecture")
                for key, item in value.items()}
    if _is_file(value):
        included = value if os.path.isabs(value) else os.path.join(base, value)
        if not os.path.isfile(included):
            raise ValueError(f"{where} names the config file {value}, which does not exist ({included})")
        return _inline(_read_yaml(included), os.path.dirname(included), f"{where} ({value})", section, sized)
    return value


def _is_file(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(CONFIG_SUFFIXES)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _names_a_file(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_names_a_file(item) for item in value.values())
    return _is_file(value)


def _names_a_base(value: Any) -> bool:
    if isinstance(value, dict):
        return _is_file(value.get(BASE_KEY)) or any(_names_a_base(item) for item in value.values())
    return False


def _needs_inlining(raw: dict[str, Any]) -> bool:
    """Whether jsonargparse must get the stage inlined: it names a ``base:``, or its
    ``model.architecture`` names a file (which may name a ``size:``). Other file references reach
    jsonargparse as written, which reads them itself."""
    model = raw.get("model")
    architecture = model.get("architecture") if isinstance(model, dict) else None
    return any(_names_a_base(raw.get(section)) for section in ("model", "data")) or _names_a_file(architecture)


def _may_name_a_file(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:  # not a file (jsonargparse also takes YAML text)
        return False
    return any(suffix in text for suffix in CONFIG_SUFFIXES)


def fit_arguments(args: list[str]) -> list[str]:
    """The arguments of ``kangaroo fit``/``validate``, each ``--config FILE`` that names a
    ``base:`` or an architecture file (which may name its ``size:``) replaced by the
    whole stage as YAML text (jsonargparse reads a config given as text as it reads a file; it
    knows neither key). Other arguments are kept as given."""
    kept, position = [], 0
    while position < len(args):
        word = args[position]
        position += 1
        if word in ("--config", "-c") and position < len(args):
            path = args[position]
            position += 1
        elif word.startswith(("--config=", "-c=")):
            path = word.split("=", 1)[1]
        else:
            kept.append(word)
            continue
        if not _may_name_a_file(path):  # jsonargparse reads (and reports on) every other file itself
            kept += ["--config", path]
            continue
        raw = _read_yaml(path)
        if isinstance(raw, dict) and _needs_inlining(raw):
            kept += ["--config", yaml.safe_dump(read_stage_yaml(path), sort_keys=False)]
        else:
            kept += ["--config", path]
    return kept


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
