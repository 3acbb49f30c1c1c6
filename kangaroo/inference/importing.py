"""``kangaroo import``: a checkpoint of another layout into a model folder, through a key map.

A layout is a YAML file (the shipped ones in ``kangaroo/layouts/``, or a path): ``rules`` map
source key names to the model's by regular expression (``from`` must match a whole key, ``to``
may use its groups), tried in order; a rule whose result the model lacks falls through to the
next, so one map serves towers that differ (fused or separate q/k/v). ``skip`` names source keys
dropped on purpose. A rule that is a guess carries ``assumed:`` with what it assumes, and the
report lists the guesses a conversion used. Every mapped tensor must have the model's shape;
every model key must be given; every source key must be taken or skipped. ``--dry-run`` prints
the report without writing anything, so a wrong map is corrected in minutes.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

LAYOUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layouts")


@dataclass
class Rule:
    source: str
    target: str
    assumed: str | None = None

    def __post_init__(self) -> None:
        self.pattern = re.compile(self.source)


@dataclass
class Layout:
    name: str
    rules: list[Rule]
    skip: list[str] = field(default_factory=list)
    description: str = ""
    architecture: str | None = None
    tokenizer: str | None = None
    """``source``: the source folder holds the tokenizer."""
    preprocessing: dict[str, Any] | None = None
    path: str = ""


def shipped_layouts() -> list[str]:
    return sorted(os.path.basename(p)[:-len(".yaml")] for p in glob.glob(os.path.join(LAYOUTS, "*.yaml")))


def read_layout(name: str) -> Layout:
    """A shipped layout by name, or a layout YAML file by path."""
    path = name if name.endswith((".yaml", ".yml")) or os.sep in name else os.path.join(LAYOUTS, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"unknown layout {name!r}: not a file, and not one of the shipped {shipped_layouts()}")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    try:
        rules = [Rule(rule["from"], rule["to"], rule.get("assumed")) for rule in data.pop("rules")]
        for pattern in data.get("skip", []):
            re.compile(pattern)
        return Layout(rules=rules, path=path, **data)
    except (KeyError, TypeError, re.error) as err:
        raise ValueError(f"{path}: not a valid layout (rules: [{{from, to, assumed?}}], skip: [...]): {err!r}") from err


@dataclass
class Plan:
    """Which source key gives which model key, and what does not fit."""

    mapped: dict[str, str] = field(default_factory=dict)
    """model key -> source key"""
    unmapped: list[str] = field(default_factory=list)
    """source keys no rule took (with where the rules that matched them pointed)"""
    missing: list[str] = field(default_factory=list)
    """model keys no source key gave"""
    shapes: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    assumed: dict[str, int] = field(default_factory=dict)
    """assumption -> how many keys were mapped by it"""

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.shapes or self.twice)

    def report(self) -> str:
        lines = [f"mapped {len(self.mapped)} tensors, skipped {len(self.skipped)}; unmapped source keys "
                 f"{len(self.unmapped)}, missing model keys {len(self.missing)}, shape mismatches {len(self.shapes)}"]
        for title, items in (("source keys no rule takes", self.unmapped), ("model keys no source key gives",
                                                                             self.missing),
                             ("shape mismatches", self.shapes), ("model keys given twice", self.twice)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items]
        if self.assumed:
            lines.append("assumptions this conversion used (check them against the source's own code):")
            lines += [f"  {count:5d} keys: {text}" for text, count in self.assumed.items()]
        return "\n".join(lines)


def plan(layout: Layout, source: dict[str, tuple[int, ...]], model: dict[str, tuple[int, ...]]) -> Plan:
    """Applies ``layout`` to source key shapes against the model's key shapes."""
    result = Plan()
    skips = [re.compile(pattern) for pattern in layout.skip]
    for key in sorted(source):
        if any(pattern.fullmatch(key) for pattern in skips):
            result.skipped.append(key)
            continue
        tried = []
        for rule in layout.rules:
            match = rule.pattern.fullmatch(key)
            if match is None:
                continue
            target = match.expand(rule.target)
            if target not in model:
                tried.append(target)
                continue
            if target in result.mapped:
                result.twice.append(f"{target}: from {result.mapped[target]} and {key}")
            elif tuple(source[key]) != tuple(model[target]):
                result.shapes.append(f"{target} (from {key}): source {tuple(source[key])}, model {tuple(model[target])}")
            result.mapped.setdefault(target, key)
            if rule.assumed:
                result.assumed[rule.assumed] = result.assumed.get(rule.assumed, 0) + 1
            break
        else:
            result.unmapped.append(key + (f" (rules gave {tried}, which the model lacks)" if tried else ""))
    result.missing = sorted(set(model) - set(result.mapped))
    return result


class _Source:
    """The tensors of a source checkpoint by name: a folder of ``*.safetensors`` files (shards
    read one tensor at a time), or anything ``read_state_dict`` reads (this project's checkpoints
    and stage folders)."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        from kangaroo.modules.adapters import ADAPTERS_NAME
        from kangaroo.training.weights import WEIGHTS_NAME, read_state_dict, refuse_kept_apart

        self.path, self._files, self._state = path, {}, None
        refuse_kept_apart(path)
        # one file; a stage or model folder's model.safetensors (not the adapters beside it); or a
        # folder of safetensors shards
        if path.endswith(".safetensors"):
            files = [path]
        elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            files = [os.path.join(path, WEIGHTS_NAME)]
        else:
            files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors")) if os.path.basename(f) != ADAPTERS_NAME)
        if files:
            for file in files:
                with safe_open(file, "pt") as handle:
                    for key in handle.keys():
                        self._files[key] = file
        elif os.path.exists(path):
            self._state = read_state_dict(path)
        else:
            raise FileNotFoundError(f"no checkpoint at {path}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._state is not None:
            return {k: tuple(v.shape) for k, v in self._state.items()}
        from safetensors import safe_open

        shapes = {}
        for file in sorted(set(self._files.values())):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        return shapes

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        from safetensors import safe_open

        with safe_open(self._files[key], "pt") as handle:
            return handle.get_tensor(key)


def check_visual_tokens(tokenizer, visual_tokens) -> None:
    """The model's visual token ids must be special tokens of ``tokenizer``: an id past its end, or
    an ordinary token that text can produce, would put text where the model expects video."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    bad = []
    for name, token_id in vars(visual_tokens).items():
        if token_id >= len(tokenizer):
            bad.append(f"{name} {token_id}: past the tokenizer's {len(tokenizer)} tokens")
        elif token_id not in added:
            bad.append(f"{name} {token_id}: {tokenizer.convert_ids_to_tokens(token_id)!r}, an ordinary token")
    if bad:
        raise ValueError(f"the tokenizer does not hold the model's visual tokens as special tokens: {bad}")


def import_checkpoint(source: str, layout: str, output: str | None, architecture: str | None = None,
                      tokenizer: str | None = None, stage: str | None = None, dry_run: bool = False,
                      overwrite: bool = False) -> Plan:
    """Converts ``source`` (of ``layout``) into a model folder at ``output`` and returns the plan;
    with ``dry_run`` only plans. The architecture comes from ``stage`` (its model.architecture),
    else ``architecture`` (a model size), else the layout's; the tokenizer from ``tokenizer``,
    else ``stage``'s ``data.prepare``, else the source folder when the layout says it holds one;
    the preprocessing from ``stage``'s ``data.prepare``, else the layout's."""
    from kangaroo.inference.folder import Preprocessing, write_model_folder
    from kangaroo.modules.builder import build_kangaroo
    from kangaroo.modules.sizes import named_config

    spec = read_layout(layout)
    prepare = None
    if stage is not None:
        from kangaroo.training.stage_file import load_stage_file

        sections = load_stage_file(stage)
        config, prepare = sections["model"].architecture, sections["data"].prepare
    elif architecture or spec.architecture:
        config = named_config(architecture or spec.architecture)
    else:
        raise ValueError(f"layout {spec.name} names no architecture: give --architecture or --stage")
    with torch.device("meta"):
        model = build_kangaroo(config, load_weights=False)
    weights = _Source(source)
    result = plan(spec, weights.shapes(), {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if dry_run:
        return result
    if not result.ok:
        raise ValueError(f"{source} does not convert with layout {spec.name} ({spec.path}):\n{result.report()}")
    if output is None:
        raise ValueError("give --output (or --dry-run)")
    from transformers import AutoTokenizer

    name = tokenizer or (prepare.tokenizer if prepare is not None else None) or \
        (source if spec.tokenizer == "source" else None)
    if name is None:
        raise ValueError(f"layout {spec.name}: the source holds no tokenizer; give --tokenizer or --stage")
    loaded = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    check_visual_tokens(loaded, config.visual_tokens)
    if prepare is not None:
        from dataclasses import replace

        preprocessing = Preprocessing(image_size=config.vision_tower.image_size, resize=prepare.resize,
                                      sampling=replace(prepare.sampling, min_duration=0.0),
                                      image_max_time=prepare.image_max_time, max_tokens=prepare.max_tokens)
    else:
        preprocessing = Preprocessing.from_dict({"image_size": config.vision_tower.image_size,
                                                 **(spec.preprocessing or {})})
    state = {target: weights.get(key) for target, key in result.mapped.items()}
    write_model_folder(output, config, state, loaded, preprocessing, overwrite=overwrite,
                       source={"weights": os.path.abspath(source), "layout": spec.path})
    return result
