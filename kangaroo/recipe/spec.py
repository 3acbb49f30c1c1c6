"""Recipes: the five stages chained, each a ``kangaroo fit`` whose weights start the next.

A recipe file (``recipes/*.yaml``)::

    name: kangaroo-tiny
    workdir: ../runs/kangaroo-tiny        # default for --workdir
    world: ../data/kangaroo-tiny          # optional: the synthetic world, generated if missing
    stages:
      - name: 1-image-pretrain
        config: ../configs/kangaroo-tiny/1-image-pretrain.yaml
        prepare: {train: ${world}/1-image-pretrain-train.jsonl, val: ${world}/1-image-pretrain-val.jsonl}
        overrides: {model.architecture.language_model.pretrained: ${world}/llm}
      - name: 2-video-pretrain
        config: ../configs/kangaroo-tiny/2-video-pretrain.yaml
        init_from: 1-image-pretrain
        eval:                             # optional: benchmarks scored on the stage's model folder
          - {benchmark: videomme, data: ${world}/held-out.videomme.jsonl, videos: ${world}}
      - name: 3-preference
        config: ...
        init_from: 2-video-pretrain
        optional: true                    # runs only when named: --with preference (or 3-preference)

An optional stage comes after every stage that is not, and runs only when ``--with`` names it
(its name, or its name without the leading number).

Paths in the recipe resolve against the recipe file; ``${world}`` and ``${workdir}`` expand in
``prepare`` and ``overrides``. Each stage runs in ``WORKDIR/<stage>/`` from a fully merged
``stage.yaml`` (the stage config, the overrides, the workdir paths). Each stage is a separate
``kangaroo fit`` process, so Lightning's own launcher handles ``devices > 1``.
``WORKDIR/recipe-state.json`` records each stage's status, checkpoint, metrics and config
hash. The last stage, and every stage that names ``eval:`` benchmarks, is exported as a model
folder (``WORKDIR/<stage>/model``, see ``kangaroo.inference.folder``); each benchmark is then
scored on it (``kangaroo eval``, into ``WORKDIR/<stage>/eval/<name>``) and its figures go into
the state file, ``summary.json``, the printed table and ``summary.png``.

The workdir may be an object-store prefix (``--workdir s3://bucket/runs/tiny``): prepared data,
checkpoints, stage weights, metrics, the state file and the summary then live there, and a
machine that replaces a preempted one continues from them. The stage's merged config and its
logs are written to a local scratch folder (``KANGAROO_SCRATCH``, default
``~/.cache/kangaroo/workdirs/``) and copied beside the stage's checkpoints when it ends.
"""


from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from kangaroo import storage
from kangaroo.training.stage_file import read_stage_yaml
from kangaroo.training.weights import WEIGHTS_NAME


class RecipeError(ValueError):
    """A recipe or workdir problem found before any training."""


@dataclass
class Evaluation:
    """One benchmark a stage is scored on (the options of ``kangaroo eval``)."""

    benchmark: str
    data: str
    videos: str | None = None
    mode: str = "generate"
    frames: int | None = None
    fps: float | None = None
    name: str | None = None
    """The name its figures go under (default: the benchmark's)."""

    @property
    def label(self) -> str:
        return self.name or self.benchmark


@dataclass
class Stage:
    name: str
    config: str
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    prepare: dict[str, str] = field(default_factory=dict)
    eval: list[Evaluation] = field(default_factory=list)
    optional: bool = False
    """Run only when named by ``--with``."""

    def named(self, name: str) -> bool:
        """Whether ``name`` names this stage: its name, or its name without the leading number."""
        return name == self.name or name == self.name.split("-", 1)[-1] and self.name.split("-", 1)[0].isdigit()


@dataclass
class Recipe:
    name: str
    path: str
    stages: list[Stage]
    workdir: str | None = None
    world: str | None = None
    world_config: dict[str, Any] | None = None
    """Sizes of the synthetic world generated into ``world`` when it is missing
    (``kangaroo.world.WorldConfig`` fields; default: the tiny recipe's world)."""

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"{self.path}: no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def index(self, name: str) -> int:
        return self.stages.index(self.stage(name))

    def selected(self, names: list[str] | None = None) -> "Recipe":
        """The recipe with the optional stages ``names`` names, without the other optional ones."""
        from dataclasses import replace

        names = list(names or [])
        optional = [stage for stage in self.stages if stage.optional]
        unknown = [n for n in names if not any(stage.named(n) for stage in optional)]
        if unknown:
            raise RecipeError(f"{self.path}: --with {unknown} names no optional stage; optional stages are "
                              f"{[s.name for s in optional] or 'none'}")
        kept = [s for s in self.stages if not s.optional or any(s.named(n) for n in names)]
        left = {s.name for s in self.stages} - {s.name for s in kept}
        for stage in kept:
            if stage.init_from in left:
                raise RecipeError(f"{self.path}: stage {stage.name!r} starts from {stage.init_from!r}, an optional "
                                  f"stage not named: add --with {stage.init_from}")
        return replace(self, stages=kept)


def load_recipe(path: str) -> Recipe:
    """Reads and checks a recipe: every config exists, every ``init_from`` names an earlier
    stage, no cycle, no duplicate names."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise RecipeError(f"{path}: a recipe is a mapping with a non-empty `stages:` list")
    unknown = sorted(set(raw) - {"name", "workdir", "world", "stages"})
    if unknown:
        raise RecipeError(f"{path}: unknown recipe key(s) {unknown}")
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if p is None or storage.is_remote(p) or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))  # noqa: E731
    world = resolve(raw.get("world"))
    stages = []
    for number, entry in enumerate(raw["stages"], 1):
        if not isinstance(entry, dict) or "name" not in entry or "config" not in entry:
            raise RecipeError(f"{path}: stage {number} needs a `name` and a `config`")
        extra = sorted(set(entry) - {"name", "config", "init_from", "overrides", "prepare", "eval", "optional"})
        if extra:
            raise RecipeError(f"{path}: stage {entry['name']!r} has unknown key(s) {extra}")
        stage = Stage(entry["name"], resolve(entry["config"]), entry.get("init_from"),
                      dict(entry.get("overrides") or {}),
                      {split: resolve(_expand(p, world=world)) for split, p in (entry.get("prepare") or {}).items()},
                      _evaluations(entry.get("eval"), f"{path}: stage {entry['name']!r}", resolve, world),
                      bool(entry.get("optional", False)))
        if not os.path.isfile(stage.config):
            raise RecipeError(f"{path}: stage {stage.name!r} names config {stage.config}, which does not exist")
        bad_splits = sorted(set(stage.prepare) - {"train", "val"})
        if bad_splits:
            raise RecipeError(f"{path}: stage {stage.name!r} prepare keys must be train/val, got {bad_splits}")
        stages.append(stage)
    names = [s.name for s in stages]
    flags = [s.optional for s in stages]
    if True in flags and False in flags[flags.index(True):]:
        raise RecipeError(f"{path}: optional stages come after every stage that is not (got {names})")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{path}: duplicate stage name(s) {duplicates}")
    for position, stage in enumerate(stages):
        if stage.init_from is None:
            continue
        if stage.init_from == stage.name:
            raise RecipeError(f"{path}: stage {stage.name!r} initialises from itself (a cycle)")
        if stage.init_from not in names:
            raise RecipeError(f"{path}: stage {stage.name!r} initialises from unknown stage {stage.init_from!r}")
        if names.index(stage.init_from) > position:
            chain = _chain(stages, stage.name)
            kind = "a cycle" if stage.name in chain[1:] else "a later stage"
            raise RecipeError(f"{path}: stage {stage.name!r} initialises from {stage.init_from!r}, {kind}; "
                              f"stages run in order {names}")
    return Recipe(raw.get("name") or os.path.splitext(os.path.basename(path))[0], os.path.abspath(path), stages,
                  resolve(raw.get("workdir")), world)


def _evaluations(raw: Any, where: str, resolve, world: str | None) -> list[Evaluation]:
    from dataclasses import fields

    from kangaroo.evaluation.benchmarks import READERS

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RecipeError(f"{where}: `eval` is a list of benchmarks ({{benchmark, data, videos}})")
    known = {f.name for f in fields(Evaluation)}
    evaluations = []
    for item in raw:
        if not isinstance(item, dict) or "benchmark" not in item or "data" not in item:
            raise RecipeError(f"{where}: each `eval` entry needs a `benchmark` and `data`, got {item!r}")
        unknown = sorted(set(item) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown `eval` key(s) {unknown}; known: {sorted(known)}")
        if item["benchmark"] not in READERS:
            raise RecipeError(f"{where}: unknown benchmark {item['benchmark']!r}; known: {sorted(READERS)}")
        if item.get("mode", "generate") not in ("generate", "likelihood"):
            raise RecipeError(f"{where}: eval mode must be generate or likelihood, got {item['mode']!r}")
        evaluation = Evaluation(**item)
        evaluation.data = resolve(_expand(evaluation.data, world=world))
        evaluation.videos = resolve(_expand(evaluation.videos, world=world))
        evaluations.append(evaluation)
    labels = [e.label for e in evaluations]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"{where}: two `eval` entries named alike {labels}; give one a `name`")
    return evaluations


def _chain(stages: list[Stage], start: str) -> list[str]:
    by_name = {s.name: s for s in stages}
    chain, current = [start], by_name[start].init_from
    while current is not None and current not in chain:
        chain.append(current)
        current = by_name[current].init_from if current in by_name else None
    if current is not None:
        chain.append(current)
    return chain


def _expand(value: Any, **names: str | None) -> Any:
    if not isinstance(value, str):
        return value
    for key, replacement in names.items():
        token = "${" + key + "}"
        if token in value:
            if replacement is None:
                raise RecipeError(f"{value!r} uses {token}, but the recipe does not set `{key}`")
            value = value.replace(token, replacement)
    return value


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# -- resolving the stages against a workdir ----------------------------------------------------

def stage_dir(workdir: str, stage: Stage) -> str:
    return storage.join(workdir, stage.name)


def data_dir(workdir: str, stage: Stage, split: str) -> str:
    return storage.join(workdir, "data", stage.name, split)


def local_stage_dir(workdir: str, stage: Stage) -> str:
    """Where the stage's merged config and logs are written: the stage folder itself for a
    local workdir; a scratch folder for an object-store one."""
    if not storage.is_remote(workdir):
        return stage_dir(workdir, stage)
    scratch = os.environ.get("KANGAROO_SCRATCH") or os.path.join(os.path.expanduser("~"), ".cache", "kangaroo", "workdirs")
    return os.path.join(scratch, hashlib.sha256(workdir.encode()).hexdigest()[:12], stage.name)


def merged_config(recipe: Recipe, stage: Stage, workdir: str) -> dict[str, Any]:
    """The stage config with the recipe's overrides and the workdir's paths applied."""
    config = read_stage_yaml(stage.config)  # the model files it names inlined: overrides reach into them
    root = stage_dir(workdir, stage)
    set_dotted(config, "trainer.default_root_dir", root)
    logger = config.get("trainer", {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict) and "save_dir" in logger["init_args"]:
        logger["init_args"]["save_dir"] = local_stage_dir(workdir, stage)
    for split in stage.prepare:
        set_dotted(config, f"data.{split}_dir", data_dir(workdir, stage, split))
    if stage.init_from is not None:
        source = recipe.stage(stage.init_from)
        set_dotted(config, "model.init_from", storage.join(stage_dir(workdir, source), WEIGHTS_NAME))
    for dotted, value in stage.overrides.items():
        set_dotted(config, dotted, _expand(value, world=recipe.world, workdir=workdir))
    return config


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def show_recipe(recipe: Recipe, workdir: str) -> str:
    """Every stage fully resolved: the merged config each ``kangaroo fit`` will get."""
    parts = [f"# recipe {recipe.name} ({recipe.path}), workdir {workdir}"]
    for stage in recipe.stages:
        parts.append(f"# --- stage {stage.name} (from {stage.config}"
                     + (f", init_from {stage.init_from}" if stage.init_from else "") + ")")
        if stage.prepare:
            parts.append(f"# prepare: {stage.prepare}")
        parts.append(yaml.safe_dump({stage.name: merged_config(recipe, stage, workdir)}, sort_keys=False).rstrip())
    return "\n".join(parts)
