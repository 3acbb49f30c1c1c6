"""How the recipe runner's data preparation pays for its worker processes: the tiny recipe's ten
datasets (five stages, train and val) prepared in a row with workers started by ``spawn`` (a fresh
interpreter per dataset, importing torch and the model code each time) and by ``forkserver``
(forked from one server that imported them once, what the runner uses).

Run: python benchmarks/prepare_start_method.py [--methods spawn forkserver]

Each method runs in its own fresh process, so neither finds the other's server or imports warm.
The world is generated into the recipe's world folder if missing; the chunks go to a scratch
folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "kangaroo-tiny.yaml")


def prepare_all(method: str, scratch: str) -> dict[str, float]:
    """Seconds per dataset, in the runner's order, for one start method."""
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.recipe.runner import ensure_world
    from kangaroo.recipe.spec import data_dir, load_recipe, merged_config

    recipe = load_recipe(RECIPE)
    ensure_world(recipe.world)
    seconds = {}
    for stage in recipe.stages:
        merged_path = os.path.join(scratch, f"{stage.name}.yaml")
        with open(merged_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(merged_config(recipe, stage, scratch), handle, sort_keys=False)
        sections = load_stage_file(merged_path)
        for split, manifest in stage.prepare.items():
            started = time.perf_counter()
            prepare_dataset(manifest, data_dir(scratch, stage, split), sections["data"].prepare,
                            visual_layout(sections["model"].architecture), overwrite=True, start_method=method)
            seconds[f"{stage.name}/{split}"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["spawn", "forkserver"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one method in this fresh process; the result as the last line
        with tempfile.TemporaryDirectory(prefix="kangaroo-prepare-bench-") as scratch:
            print(json.dumps(prepare_all(args.child, scratch)), flush=True)
        return
    results = {}
    for method in args.methods:
        print(f"preparing the tiny recipe's ten datasets with {method} workers ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    names = list(next(iter(results.values())))
    print(f"{'dataset':<34}" + "".join(f"{m:>12}" for m in args.methods))
    for name in names:
        print(f"{name:<34}" + "".join(f"{results[m][name]:>11.1f}s" for m in args.methods))
    totals = {m: sum(results[m].values()) for m in args.methods}
    print(f"{'total':<34}" + "".join(f"{totals[m]:>11.1f}s" for m in args.methods))
    if {"spawn", "forkserver"} <= set(totals):
        print(f"forkserver saves {totals['spawn'] - totals['forkserver']:.1f} s "
              f"(x{totals['spawn'] / totals['forkserver']:.2f} faster)")


if __name__ == "__main__":
    main()
