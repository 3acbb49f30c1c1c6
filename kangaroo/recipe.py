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

Paths in the recipe resolve against the recipe file; ``${world}`` and ``${workdir}`` expand in
``prepare`` and ``overrides``. Each stage runs in ``WORKDIR/<stage>/`` from a fully merged
``stage.yaml`` (the stage config, the overrides, the workdir paths). Each stage is a separate
``kangaroo fit`` process, so Lightning's own launcher handles ``devices > 1``.
``WORKDIR/recipe-state.json`` records each stage's status, checkpoint, metrics and config
hash.

The workdir may be an object-store prefix (``--workdir s3://bucket/runs/tiny``): prepared data,
checkpoints, stage weights, metrics, the state file and the summary then live there, and a
machine that replaces a preempted one continues from them. The stage's merged config and its
logs are written to a local scratch folder (``KANGAROO_SCRATCH``, default
``~/.cache/kangaroo/workdirs/``) and copied beside the stage's checkpoints when it ends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from kangaroo import storage
from kangaroo.checkpoints import PREEMPTED_EXIT_CODE, latest_checkpoint
from kangaroo.modules.stage import METRICS_NAME
from kangaroo.modules.weights import WEIGHTS_NAME

STATE_NAME = "recipe-state.json"


class RecipeError(ValueError):
    """A recipe or workdir problem found before any training."""


@dataclass
class Stage:
    name: str
    config: str
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    prepare: dict[str, str] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    path: str
    stages: list[Stage]
    workdir: str | None = None
    world: str | None = None

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"{self.path}: no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def index(self, name: str) -> int:
        return self.stages.index(self.stage(name))


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
        extra = sorted(set(entry) - {"name", "config", "init_from", "overrides", "prepare"})
        if extra:
            raise RecipeError(f"{path}: stage {entry['name']!r} has unknown key(s) {extra}")
        stage = Stage(entry["name"], resolve(entry["config"]), entry.get("init_from"),
                      dict(entry.get("overrides") or {}),
                      {split: resolve(_expand(p, world=world)) for split, p in (entry.get("prepare") or {}).items()})
        if not os.path.isfile(stage.config):
            raise RecipeError(f"{path}: stage {stage.name!r} names config {stage.config}, which does not exist")
        bad_splits = sorted(set(stage.prepare) - {"train", "val"})
        if bad_splits:
            raise RecipeError(f"{path}: stage {stage.name!r} prepare keys must be train/val, got {bad_splits}")
        stages.append(stage)
    names = [s.name for s in stages]
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


def _set_dotted(config: dict, dotted: str, value: Any) -> None:
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
    with open(stage.config, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config = copy.deepcopy(config)
    root = stage_dir(workdir, stage)
    _set_dotted(config, "trainer.default_root_dir", root)
    logger = config.get("trainer", {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict) and "save_dir" in logger["init_args"]:
        logger["init_args"]["save_dir"] = local_stage_dir(workdir, stage)
    for split in stage.prepare:
        _set_dotted(config, f"data.{split}_dir", data_dir(workdir, stage, split))
    if stage.init_from is not None:
        source = recipe.stage(stage.init_from)
        _set_dotted(config, "model.init_from", storage.join(stage_dir(workdir, source), WEIGHTS_NAME))
    for dotted, value in stage.overrides.items():
        _set_dotted(config, dotted, _expand(value, world=recipe.world, workdir=workdir))
    return config


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# -- the state file -------------------------------------------------------------------------

def read_state(workdir: str, recipe: Recipe) -> dict[str, Any]:
    path = storage.join(workdir, STATE_NAME)
    if not storage.exists(path):
        return {"recipe": recipe.name, "recipe_path": recipe.path,
                "stages": {s.name: {"status": "pending"} for s in recipe.stages}}
    state = json.loads(storage.read_text(path))
    if state.get("recipe") != recipe.name:
        raise RecipeError(f"{workdir} belongs to recipe {state.get('recipe')!r} ({state.get('recipe_path')}), "
                          f"not {recipe.name!r}; use another --workdir")
    for stage in recipe.stages:
        state["stages"].setdefault(stage.name, {"status": "pending"})
    return state


def write_state(workdir: str, state: dict[str, Any]) -> None:
    storage.write_text(storage.join(workdir, STATE_NAME), json.dumps(state, indent=2))


# -- running ----------------------------------------------------------------------------------

def select_stages(recipe: Recipe, only: str | None, until: str | None, restart_from: str | None) -> list[Stage]:
    stages = recipe.stages
    if only is not None:
        return [recipe.stage(only)]
    if until is not None:
        stages = stages[: recipe.index(until) + 1]
    if restart_from is not None:
        recipe.stage(restart_from)
    return stages


def plan(recipe: Recipe, workdir: str, state: dict[str, Any], stages: list[Stage], restart_from: str | None) -> list[Stage]:
    """Stages to run, after every check that needs no training: changed configs, missing
    checkpoints of stages this run starts from."""
    restart_index = recipe.index(restart_from) if restart_from else None
    todo = []
    for stage in stages:
        entry = state["stages"][stage.name]
        merged = merged_config(recipe, stage, workdir)
        if restart_index is not None and recipe.index(stage.name) >= restart_index:
            entry.clear()
            entry["status"] = "pending"
        if entry.get("status") == "done":
            if entry.get("config_hash") != config_hash(merged):
                raise RecipeError(
                    f"stage {stage.name!r} is done but its config changed since (hash {entry.get('config_hash')} -> "
                    f"{config_hash(merged)}); it is neither redone nor kept silently: pass --restart-from {stage.name} "
                    "to redo it and the stages after it, or restore the config")
            if not storage.exists(storage.join(stage_dir(workdir, stage), WEIGHTS_NAME)):
                raise RecipeError(f"stage {stage.name!r} is marked done but {stage_dir(workdir, stage)}/{WEIGHTS_NAME} "
                                  f"is missing; pass --restart-from {stage.name}")
            continue
        todo.append(stage)
    planned = {s.name for s in todo}
    for stage in todo:
        if stage.init_from is not None and stage.init_from not in planned:
            weights = storage.join(stage_dir(workdir, recipe.stage(stage.init_from)), WEIGHTS_NAME)
            if not storage.exists(weights):
                raise RecipeError(f"stage {stage.name!r} starts from {stage.init_from!r}, whose checkpoint {weights} "
                                  "does not exist; run that stage first")
    return todo


class Preempted(RuntimeError):
    """A stage stopped for SIGTERM with its checkpoint saved (``kangaroo recipe run`` exits 75)."""


def _run_forwarding_sigterm(command: list[str]) -> int:
    """Runs a stage's fit. A SIGTERM to the runner is passed on to the fit, which finishes its
    step, saves a checkpoint and exits with ``PREEMPTED_EXIT_CODE``; the runner waits for that
    instead of dying first and leaving the state file at "running"."""
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_stage(recipe: Recipe, stage: Stage, workdir: str, merged_path: str, workers: int) -> None:
    from kangaroo.config import load_stage_file
    from kangaroo.data.prepare import prepare_dataset

    for split, manifest in stage.prepare.items():
        output = data_dir(workdir, stage, split)
        if storage.exists(storage.join(output, "index.json")):
            continue
        sections = load_stage_file(merged_path)
        print(f"[{stage.name}] preparing {split} data from {manifest}", flush=True)
        report = prepare_dataset(manifest, output, sections["data"].prepare, sections["model"].architecture,
                                 workers=workers, overwrite=True, start_method="forkserver")
        print(report.summary(), flush=True)


def run_recipe(recipe: Recipe, workdir: str, only: str | None = None, until: str | None = None,
               restart_from: str | None = None, prepare_workers: int = 1) -> dict[str, Any]:
    workdir = storage.absolute(workdir)
    state = read_state(workdir, recipe)
    write_state(workdir, state)  # claims the workdir for this recipe
    stages = select_stages(recipe, only, until, restart_from)
    todo = plan(recipe, workdir, state, stages, restart_from)
    write_state(workdir, state)
    if recipe.world is not None and todo:
        ensure_world(recipe.world)
    for stage in todo:
        entry = state["stages"][stage.name]
        root, local_root = stage_dir(workdir, stage), local_stage_dir(workdir, stage)
        os.makedirs(local_root, exist_ok=True)  # the stage folder itself for a local workdir
        merged = merged_config(recipe, stage, workdir)
        merged_path = os.path.join(local_root, "stage.yaml")
        with open(merged_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(merged, handle, sort_keys=False)
        resume = latest_checkpoint(root) if entry.get("status") in ("running", "failed", "preempted") else None
        if entry.get("status") in (None, "pending"):
            for stale in storage.find(root, ".ckpt"):
                storage.remove(stale)  # a restarted stage never resumes from its previous run
        entry.update(status="running", config_hash=config_hash(merged), checkpoint=None,
                     started=entry.get("started") or time.time())
        write_state(workdir, state)
        prepare_stage(recipe, stage, workdir, merged_path, prepare_workers)
        command = [sys.executable, "-m", "kangaroo.cli", "fit", "--config", merged_path]
        if resume:
            command.append(f"--ckpt_path={resume}")
            print(f"[{stage.name}] resuming from {resume}", flush=True)
        print(f"[{stage.name}] {' '.join(command[2:])}", flush=True)
        started = time.time()
        returncode = _run_forwarding_sigterm(command)
        if local_root != root:  # the config and logs beside the stage's checkpoints
            storage.upload(local_root, root)
        if returncode == PREEMPTED_EXIT_CODE:
            entry.update(status="preempted", returncode=returncode)
            write_state(workdir, state)
            raise Preempted(f"stage {stage.name!r} stopped for SIGTERM after saving a checkpoint; run the recipe "
                            "again to continue from it")
        if returncode != 0:
            entry.update(status="failed", returncode=returncode)
            write_state(workdir, state)
            raise RuntimeError(f"stage {stage.name!r} failed with exit code {returncode}; "
                               f"logs in {root}. Running the recipe again resumes it from its last checkpoint")
        metrics = json.loads(storage.read_text(storage.join(root, METRICS_NAME)))
        entry.update(status="done", checkpoint=storage.join(root, WEIGHTS_NAME),
                     seconds=round(entry.get("seconds", 0.0) + time.time() - started, 1),
                     metrics={k: metrics[k] for k in ("steps", "final_loss", "eval_accuracy", "eval")})
        write_state(workdir, state)
    summary = write_summary(recipe, workdir, state)
    print(format_summary(summary), flush=True)
    return summary


def ensure_world(path: str) -> None:
    if os.path.exists(os.path.join(path, "world.json")):
        return
    from kangaroo.data.synth import synthesize

    print(f"generating the synthetic world in {path}", flush=True)
    synthesize(path)


# -- summary ----------------------------------------------------------------------------------

def write_summary(recipe: Recipe, workdir: str, state: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for stage in recipe.stages:
        entry = state["stages"].get(stage.name, {})
        metrics = entry.get("metrics") or {}
        rows.append({"name": stage.name, "status": entry.get("status", "pending"), "steps": metrics.get("steps"),
                     "final_loss": metrics.get("final_loss"), "eval_accuracy": _number(metrics.get("eval_accuracy")),
                     "eval": metrics.get("eval", {}), "seconds": entry.get("seconds")})
    done = [r for r in rows if r["status"] == "done" and r["eval_accuracy"] is not None]
    summary = {"recipe": recipe.name, "stages": rows, "final_eval_accuracy": done[-1]["eval_accuracy"] if done else None}
    storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    plot_summary(recipe, workdir, rows)
    return summary


def _number(value: Any) -> float | None:
    return None if value is None or value != value else float(value)  # nan -> None


def plot_summary(recipe: Recipe, workdir: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for stage in recipe.stages:
        path = storage.join(stage_dir(workdir, stage), METRICS_NAME)
        if not storage.exists(path):
            continue
        history = json.loads(storage.read_text(path)).get("loss_history", [])
        if history:
            steps = [offset + step for step, _ in history]
            loss_axis.plot(steps, [loss for _, loss in history], label=stage.name)
            offset = steps[-1] + 1
    loss_axis.set(title="training loss across stages", xlabel="step (stages in sequence)", ylabel="loss")
    loss_axis.legend(fontsize=7)
    names = [r["name"].split("-", 1)[0] for r in rows]
    accuracy_axis.plot(names, [r["eval_accuracy"] if r["eval_accuracy"] is not None else float("nan") for r in rows],
                       marker="o", label="all")
    for group in sorted({k for r in rows for k in r["eval"] if k.startswith("val/accuracy/")}):
        accuracy_axis.plot(names, [_number(r["eval"].get(group)) or float("nan") for r in rows], marker=".",
                           label=group.rsplit("/", 1)[-1])
    accuracy_axis.axhline(0.25, color="grey", linestyle=":", label="chance")
    accuracy_axis.set(title="held-out multiple-choice accuracy", xlabel="stage", ylim=(0, 1))
    accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    with storage.local_output(storage.join(workdir, "summary.png")) as local:
        figure.savefig(local, dpi=100, format="png")
    plt.close(figure)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'stage':<24}{'status':<9}{'steps':>7}{'final loss':>12}{'accuracy':>10}{'seconds':>9}"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for row in summary["stages"]:
        lines.append(f"{row['name']:<24}{row['status']:<9}{fmt(row['steps'], 'd'):>7}{fmt(row['final_loss'], '.3f'):>12}"
                     f"{fmt(row['eval_accuracy'], '.3f'):>10}{fmt(row['seconds'], '.0f'):>9}")
    lines.append(f"final held-out accuracy: {fmt(summary['final_eval_accuracy'], '.3f')}")
    return "\n".join(lines)


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
