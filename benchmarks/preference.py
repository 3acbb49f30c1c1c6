"""The tiny recipe's preference stage over world seeds: held-out preference accuracy before
(the stage-5 model) and after DPO, and the held-out multiple-choice accuracy it costs, with the
LLM training whole and with LoRA adapters alone.

For each seed: the world (``kangaroo data synth --seed``), the five stages and both optional
preference stages (``--with preference --with preference-lora``): seed 0 in the recipe's own
world and workdir (what ``kangaroo recipe run recipes/kangaroo-tiny.yaml`` made, its done stages
kept), other seeds in ``ROOT/world-<seed>`` and ``ROOT/seed-<seed>``. Before:
``val/preference_accuracy`` of the stage-5 model on the held-out pairs (the preference stage's
own validation with nothing trained: the policy is the reference). After: the stage's own
``val/preference_accuracy``. Multiple choice: the recipe's ``kangaroo eval`` of the held-out
questions (generated replies) on the stage-5 model folder and on each preference stage's. Prints
each seed and min / median / max over the seeds.

Run: python benchmarks/preference.py [--seeds 0 1 2] [--root runs/preference-benchmark]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "kangaroo-tiny.yaml")
STAGES = ("6-preference", "6-preference-lora")


def with_world(recipe, world: str):
    """The recipe with its world folder replaced by ``world`` (in prepare, overrides and eval)."""
    old = recipe.world
    swap = lambda value: value.replace(old, world) if isinstance(value, str) else value  # noqa: E731
    for stage in recipe.stages:
        stage.prepare = {k: swap(v) for k, v in stage.prepare.items()}
        stage.overrides = {k: swap(v) for k, v in stage.overrides.items()}
        for evaluation in stage.eval:
            evaluation.data, evaluation.videos = swap(evaluation.data), swap(evaluation.videos)
    recipe.world = world
    return recipe


def preference_accuracy_at_start(stage_dir: str) -> float:
    """The preference stage's validation before any step (its reference is its policy)."""
    import lightning as L

    from kangaroo.training.stage_file import load_stage_file

    sections = load_stage_file(os.path.join(stage_dir, "stage.yaml"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(sections["model"], datamodule=sections["data"], verbose=False)
    return float(results[0]["val/preference_accuracy"])


def run_seed(root: str, seed: int) -> dict[str, float]:
    from kangaroo.recipe import load_recipe, run_recipe
    from kangaroo.world.build import synthesize
    from kangaroo.world.render import WorldConfig

    recipe = load_recipe(RECIPE).selected(["preference", "preference-lora"])
    if seed == 0:  # the recipe's own world (seed 0) and workdir
        world, workdir = recipe.world, recipe.workdir
    else:
        world = os.path.abspath(os.path.join(root, f"world-{seed}"))
        workdir = os.path.abspath(os.path.join(root, f"seed-{seed}"))
        recipe = with_world(recipe, world)
    synthesize(world, WorldConfig(seed=seed))
    started = time.time()
    run_recipe(recipe, workdir)
    state = json.load(open(os.path.join(workdir, "recipe-state.json"), encoding="utf-8"))["stages"]

    def held_out(stage: str) -> float:
        return state[stage]["benchmarks"]["held-out"]["accuracy"]

    row = {"seconds": round(time.time() - started), "start": preference_accuracy_at_start(os.path.join(workdir, STAGES[0])),
           "mcq_stage5": held_out("5-long-video-tuning")}
    for stage in STAGES:
        metrics = json.load(open(os.path.join(workdir, stage, "stage-metrics.json"), encoding="utf-8"))["eval"]
        key = "lora" if stage.endswith("lora") else "whole"
        row[f"{key}_preference"] = metrics["val/preference_accuracy"]
        row[f"{key}_mcq"] = held_out(stage)
        row[f"{key}_mcq_change"] = round(row[f"{key}_mcq"] - row["mcq_stage5"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/preference-benchmark")
    args = parser.parse_args()
    rows = {}
    for seed in args.seeds:
        rows[seed] = run_seed(args.root, seed)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in rows[seed].items()), flush=True)
    print(f"over seeds {args.seeds} (min / median / max):")
    for key in rows[args.seeds[0]]:
        values = [rows[s][key] for s in args.seeds]
        print(f"  {key:<24} {min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
