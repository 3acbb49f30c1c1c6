"""Running a recipe: the state file, the plan (skip done stages, resume interrupted ones), each
stage as its own ``kangaroo fit`` process, and the summary at the end. The recipe file itself is
described in ``kangaroo.recipe.spec``."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from typing import Any

import yaml

from kangaroo import storage
from kangaroo.recipe.spec import (Recipe, RecipeError, Stage, config_hash, data_dir, local_stage_dir, merged_config,
                                  stage_dir)
from kangaroo.recipe.nodes import Coordinator, NodeLost, NodeSetup, StageEnded, run_watched
from kangaroo.recipe.summary import format_summary, write_summary
from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE, latest_checkpoint
from kangaroo.training.watchdog import STALLED_EXIT_CODE
from kangaroo.training.stage import METRICS_NAME
from kangaroo.training.weights import WEIGHTS_NAME

STATE_NAME = "recipe-state.json"


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


def prepare_stage(recipe: Recipe, stage: Stage, workdir: str, merged_path: str, workers: int) -> None:
    from kangaroo.training.commands import prepare_stage_data

    for split, manifest in stage.prepare.items():
        output = data_dir(workdir, stage, split)
        if storage.exists(storage.join(output, "index.json")):
            continue
        print(f"[{stage.name}] preparing {split} data from {manifest}", flush=True)
        # forkserver: this process holds threads (the node coordinator's), which fork would copy mid-call
        if prepare_stage_data(manifest=manifest, stage=merged_path, output=output, workers=workers, overwrite=True,
                              start_method="forkserver"):
            raise RuntimeError(f"[{stage.name}] no usable sample in {manifest} (its rejects: {output}/rejects.jsonl)")


def _fit_command(merged_path: str, resume: str | None, nodes: NodeSetup) -> list[str]:
    command = [sys.executable, "-m", "kangaroo.cli", "fit", "--config", merged_path]
    if nodes.num_nodes > 1:
        command.append(f"--trainer.num_nodes={nodes.num_nodes}")
    if resume:
        command.append(f"--ckpt_path={resume}")
    return command


def run_recipe(recipe: Recipe, workdir: str, only: str | None = None, until: str | None = None,
               restart_from: str | None = None, prepare_workers: int = 1,
               nodes: NodeSetup | None = None) -> dict[str, Any]:
    """Runs the recipe; on several nodes (``nodes``), node 0 leads and the others follow it (see
    ``kangaroo.recipe.nodes``). Returns the summary (a follower: the stages it ran)."""
    nodes = nodes or NodeSetup()
    workdir = storage.absolute(workdir)
    if nodes.num_nodes == 1:
        return _lead(recipe, workdir, only, until, restart_from, prepare_workers, nodes, None)
    coordinator = Coordinator(nodes)
    try:
        coordinator.joined()
        if not nodes.leader:
            return _follow(recipe, workdir, nodes, coordinator)
        try:
            return _lead(recipe, workdir, only, until, restart_from, prepare_workers, nodes, coordinator)
        except Preempted:
            raise  # the verdict told the others: their fits save and exit 75 on their own
        except BaseException as err:
            coordinator.abort(f"{type(err).__name__}: {err}")
            raise
    finally:
        coordinator.close()


def _lead(recipe: Recipe, workdir: str, only: str | None, until: str | None, restart_from: str | None,
          prepare_workers: int, nodes: NodeSetup, coordinator: Coordinator | None) -> dict[str, Any]:
    state = read_state(workdir, recipe)
    write_state(workdir, state)  # claims the workdir for this recipe
    stages = select_stages(recipe, only, until, restart_from)
    todo = plan(recipe, workdir, state, stages, restart_from)
    write_state(workdir, state)
    if recipe.world is not None and todo:
        ensure_world(recipe.world, recipe.world_config)
    for index, stage in enumerate(todo):
        entry = state["stages"][stage.name]
        root, local_root = stage_dir(workdir, stage), local_stage_dir(workdir, stage)
        os.makedirs(local_root, exist_ok=True)  # the stage folder itself for a local workdir
        merged = merged_config(recipe, stage, workdir)
        merged_text = yaml.safe_dump(merged, sort_keys=False)
        merged_path = os.path.join(local_root, "stage.yaml")
        storage.write_text(merged_path, merged_text)  # renamed into place: another node may be reading it
        resume = latest_checkpoint(root) if entry.get("status") in ("running", "failed", "preempted") else None
        if entry.get("status") in (None, "pending"):
            for stale in storage.find(root, ".ckpt"):
                storage.remove(stale)  # a restarted stage never resumes from its previous run
        entry.update(status="running", config_hash=config_hash(merged), checkpoint=None,
                     started=entry.get("started") or time.time())
        write_state(workdir, state)
        prepare_stage(recipe, stage, workdir, merged_path, prepare_workers)
        command = _fit_command(merged_path, resume, nodes)
        if resume:
            print(f"[{stage.name}] resuming from {resume}", flush=True)
        print(f"[{stage.name}] {' '.join(command[2:])}", flush=True)
        if coordinator is not None:  # the data is ready: the other nodes start their part
            coordinator.publish(f"stage/{index}", {"name": stage.name, "config": merged_text, "resume": resume})
        started = time.time()
        try:
            watch = (lambda: coordinator.check_stage(index)) if coordinator else None  # noqa: B023 - called in-loop
            returncode = run_watched(command, watch, env=nodes.fit_environment() if coordinator else None)
        except NodeLost as err:
            entry.update(status="failed", returncode=None)
            write_state(workdir, state)
            _verdict(coordinator, index, "failed")
            raise RuntimeError(f"stage {stage.name!r} stopped: {err}. Run the recipe again on every node to resume "
                               "it from its last checkpoint") from err
        finally:
            if local_root != root:  # the config and logs beside the stage's checkpoints
                storage.upload(local_root, root)
        if returncode == PREEMPTED_EXIT_CODE:
            entry.update(status="preempted", returncode=returncode)
            write_state(workdir, state)
            _verdict(coordinator, index, "preempted")
            raise Preempted(f"stage {stage.name!r} stopped for SIGTERM after saving a checkpoint; run the recipe "
                            "again to continue from it")
        if returncode != 0:
            entry.update(status="failed", returncode=returncode)
            write_state(workdir, state)
            _verdict(coordinator, index, "failed")
            why = (" (a process made no progress within StallWatchdog's bound: a stuck collective)"
                   if returncode == STALLED_EXIT_CODE else "")
            raise RuntimeError(f"stage {stage.name!r} failed with exit code {returncode}{why}; "
                               f"logs in {root}. Running the recipe again resumes it from its last checkpoint")
        metrics = json.loads(storage.read_text(storage.join(root, METRICS_NAME)))
        entry.update(status="done", checkpoint=storage.join(root, WEIGHTS_NAME),
                     seconds=round(entry.get("seconds", 0.0) + time.time() - started, 1),
                     metrics={k: metrics[k] for k in ("steps", "final_loss", "eval_accuracy", "eval")})
        entry.pop("benchmarks", None)  # figures and folder of an earlier run of this stage
        entry.pop("model_folder", None)
        write_state(workdir, state)
        _verdict(coordinator, index, "done")
    if coordinator is not None:  # the rest (model folders, benchmarks, summary) is node 0's alone
        coordinator.publish(f"stage/{len(todo)}", {"end": True})
        coordinator.finish()
    for stage in stages:  # stages done now, and done stages whose model folder or benchmarks are missing
        if state["stages"][stage.name].get("status") == "done":
            finish_stage(recipe, stage, workdir, state)
    summary = write_summary(recipe, workdir, state)
    print(format_summary(summary), flush=True)
    return summary


def _verdict(coordinator: Coordinator | None, index: int, status: str) -> None:
    if coordinator is not None:
        coordinator.publish(f"verdict/{index}", {"status": status})
        if status != "done":  # the run ends here: the followers read it before the store closes
            coordinator.wait_acknowledged(index)


def _follow(recipe: Recipe, workdir: str, nodes: NodeSetup, coordinator: Coordinator) -> dict[str, Any]:
    """A node other than 0: runs its part of each stage node 0 announces, until the end."""
    ran = []
    for index in itertools.count():
        message = coordinator.receive(f"stage/{index}")
        if message.get("end"):
            coordinator.finish()
            print(f"node {nodes.node_rank}: node 0 finished the recipe's stages", flush=True)
            return {"node": nodes.node_rank, "stages": ran}
        stage = recipe.stage(message["name"])
        local_root = local_stage_dir(workdir, stage)
        os.makedirs(local_root, exist_ok=True)
        merged_path = os.path.join(local_root, "stage.yaml")
        storage.write_text(merged_path, message["config"])
        command = _fit_command(merged_path, message["resume"], nodes)
        print(f"[{stage.name}] node {nodes.node_rank}: {' '.join(command[2:])}", flush=True)
        try:
            returncode: int | None = run_watched(command, lambda: coordinator.check_follower(index),  # noqa: B023
                                                 env=nodes.fit_environment())
        except StageEnded:
            returncode = None  # stopped: the verdict below says how the stage ended
        except NodeLost as err:
            raise RuntimeError(f"stage {stage.name!r} stopped: {err}. Run the recipe again on every node to resume "
                               "it from its last checkpoint") from err
        if returncode is not None:
            coordinator.report(index, returncode)
        verdict = coordinator.receive(f"verdict/{index}")["status"]
        coordinator.acknowledge(index)
        if verdict == "preempted":
            raise Preempted(f"stage {stage.name!r} stopped for SIGTERM after saving a checkpoint; run the recipe "
                            "again on every node to continue from it")
        if verdict != "done":
            raise RuntimeError(f"stage {stage.name!r} failed (this node's part ended with {returncode}); node 0's "
                               "log says why. Running the recipe again on every node resumes it")
        ran.append(stage.name)
    raise AssertionError("unreachable")


MODEL_FOLDER = "model"
EVAL_FOLDER = "eval"


def finish_stage(recipe: Recipe, stage: Stage, workdir: str, state: dict[str, Any]) -> None:
    """Exports the model folder of the last stage and of every stage naming benchmarks, then
    scores each benchmark on it (``kangaroo eval``: resumable, so a run killed here continues
    where it stopped). Skips what is already done."""
    entry = state["stages"][stage.name]
    if stage is not recipe.stages[-1] and not stage.eval:
        return
    benchmarks = entry.setdefault("benchmarks", {})
    if entry.get("model_folder") and all(e.label in benchmarks for e in stage.eval):
        return
    from kangaroo.evaluation import format_results, summarize
    from kangaroo.evaluation.run import run_benchmark
    from kangaroo.inference import Generator, export_model, load_pretrained

    root, local_root = stage_dir(workdir, stage), local_stage_dir(workdir, stage)
    local_model = os.path.join(local_root, MODEL_FOLDER)
    stage_file = os.path.join(local_root, "stage.yaml")
    if not os.path.isfile(stage_file):  # done on another machine: its config lies beside its checkpoints
        storage.download(storage.join(root, "stage.yaml"), stage_file)
    if not os.path.isfile(os.path.join(local_model, WEIGHTS_NAME)) or not entry.get("model_folder"):
        print(f"[{stage.name}] exporting the model folder {storage.join(root, MODEL_FOLDER)}", flush=True)
        export_model(storage.join(root, WEIGHTS_NAME), local_model, config=stage_file, overwrite=True)
        # answers of an earlier model of this stage must not be resumed as this one's
        shutil.rmtree(os.path.join(local_root, EVAL_FOLDER), ignore_errors=True)
        benchmarks.clear()
        if local_root != root:
            storage.remove(storage.join(root, EVAL_FOLDER))
            storage.upload(local_model, storage.join(root, MODEL_FOLDER))
        entry["model_folder"] = storage.join(root, MODEL_FOLDER)
        write_state(workdir, state)
    generator = None
    for evaluation in stage.eval:
        if evaluation.label in benchmarks:
            continue
        if generator is None:
            import torch

            on_gpu = torch.cuda.is_available()
            generator = Generator(load_pretrained(local_model, device="cuda" if on_gpu else "cpu",
                                                  dtype="bfloat16" if on_gpu else None))
            base = generator.sampling
        output = os.path.join(local_root, EVAL_FOLDER, evaluation.label)
        print(f"[{stage.name}] eval {evaluation.label}: questions from {evaluation.data}", flush=True)
        questions = run_benchmark(generator, base, evaluation.benchmark, evaluation.data, output, evaluation.videos,
                                  evaluation.mode, evaluation.frames, evaluation.fps)
        results = summarize(questions, output, 1, evaluation.benchmark, evaluation.mode)
        print(format_results(results), flush=True)
        if local_root != root:
            storage.upload(output, storage.join(root, EVAL_FOLDER, evaluation.label))
        benchmarks[evaluation.label] = {k: results[k] for k in ("accuracy", "correct", "scored", "categories",
                                                                 "missing_media")}
        benchmarks[evaluation.label]["no_letter"] = len(results["no_letter"])
        write_state(workdir, state)


def ensure_world(path: str, sizes: dict[str, Any] | None = None) -> None:
    if os.path.exists(os.path.join(path, "world.json")):
        return
    from kangaroo.world import WorldConfig, synthesize

    print(f"generating the synthetic world in {path}", flush=True)
    synthesize(path, WorldConfig(**(sizes or {})))
