"""The tiny recipe end to end on this machine: wall time, held-out accuracy after every stage,
long-video accuracy before and after stage 5, the final model on blank frames, and the held-out
accuracy per kind of question after stages 4 and 5, and the recipe's own ``kangaroo eval`` of the
final model folder (generated replies, as training prompted and through the Video-MME reader).

Run: python benchmarks/tiny_recipe.py [--workdir runs/tiny-benchmark] [--fresh] [--frame-format jpeg]

The world is generated (if missing) into the recipe's world folder. Held-out clips are rendered
from their own seeds. The blank-frame check runs the final model on the same held-out
questions with every frame replaced by black. Any accuracy left must come from the text alone,
and the options are always listed in one fixed order, so text alone is near chance (0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "kangaroo-tiny.yaml")


class BlankFrames:
    """Wraps a loader: every frame becomes black (CLIP-normalised zeros of the pixel range)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        from kangaroo.data.transforms import normalize

        for batch in self.loader:
            if "pixel_values" in batch:
                black = torch.zeros(batch["pixel_values"].shape, dtype=torch.uint8)
                batch["pixel_values"] = normalize(black)
            yield batch


def finished_stage(workdir: str, stage: str):
    """The stage's module with its final weights, and its data module."""
    from kangaroo.training.stage_file import load_stage_file

    root = os.path.join(workdir, stage)
    sections = load_stage_file(os.path.join(root, "stage.yaml"))
    module, data = sections["model"], sections["data"]
    module.init_from = os.path.join(root, "model.safetensors")
    module.new_parts = []
    module.configure_model()
    return module, data


def blank_frame_accuracy(workdir: str, stage: str) -> dict[str, float]:
    import lightning as L

    module, data = finished_stage(workdir, stage)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(module, dataloaders=BlankFrames(data.val_dataloader()), verbose=False)
    return {k: float(v) for k, v in results[0].items()}


def accuracy_by_question(workdir: str, stage: str) -> dict[str, float]:
    """Held-out accuracy per kind of question: the short clips' colour, shape and direction, and
    the long clips' count and when. The world's held-out ids end with the kind
    (``val-short-3-direction``, ``val-long-7-when``)."""
    module, data = finished_stage(workdir, stage)
    module.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for batch in data.val_dataloader():
            predicted, target = module._forward(batch, first_answers=True).answers
            for sample, guess, answer in zip(batch["sample_ids"], predicted.tolist(), target.tolist(), strict=True):
                _, group, *_, kind = sample.split("-")
                key = f"{group}/{kind}"
                hits.setdefault(key, []).append(guess == answer)
    return {key: round(sum(h) / len(h), 3) for key, h in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/tiny-benchmark")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first (the world is kept)")
    parser.add_argument("--frame-format", choices=("raw", "jpeg", "webp"),
                        help="store every stage's frames so (data.prepare.frame_format; default: the configs')")
    args = parser.parse_args()
    from kangaroo.recipe import load_recipe, run_recipe

    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    recipe = load_recipe(RECIPE)
    if args.frame_format:
        for stage in recipe.stages:
            stage.overrides["data.prepare.frame_format"] = args.frame_format
    started = time.time()
    summary = run_recipe(recipe, args.workdir)
    wall = time.time() - started
    stages = {s["name"]: s for s in summary["stages"]}
    long_4 = stages["4-instruction-tuning"]["eval"].get("val/accuracy/long")
    long_5 = stages["5-long-video-tuning"]["eval"].get("val/accuracy/long")
    blank = blank_frame_accuracy(os.path.abspath(args.workdir), recipe.stages[-1].name)
    print()
    print(f"wall time, world + prepare + five stages: {wall / 60:.1f} min")
    for name, row in stages.items():
        print(f"{name:<24} steps {row['steps']:>4}  seconds {row['seconds']:>6}  accuracy {row['eval_accuracy']}  "
              f"short {row['eval'].get('val/accuracy/short')}  long {row['eval'].get('val/accuracy/long')}")
    print(f"final held-out accuracy: {summary['final_eval_accuracy']:.3f} (chance 0.25)")
    print(f"long-video questions: {long_4:.3f} after stage 4 -> {long_5:.3f} after stage 5")
    print(f"final model on blank frames: {blank['val/accuracy']:.3f}")
    by_question = {stage: accuracy_by_question(os.path.abspath(args.workdir), stage)
                   for stage in ("4-instruction-tuning", "5-long-video-tuning")}
    for stage, accuracy in by_question.items():
        print(f"held-out accuracy by question after {stage}: "
              + ", ".join(f"{key} {value:.2f}" for key, value in accuracy.items()))
    state = json.load(open(os.path.join(args.workdir, "recipe-state.json"), encoding="utf-8"))
    evaluated = state["stages"][recipe.stages[-1].name].get("benchmarks", {})
    for name, result in evaluated.items():  # kangaroo eval on the exported model folder (generated replies)
        groups = "; ".join(f"{group} " + ", ".join(f"{value} {row['accuracy']:.3f}" for value, row in rows.items())
                           for group, rows in result["categories"].items())
        print(f"kangaroo eval {name}: {result['accuracy']:.3f} ({result['correct']}/{result['scored']}, "
              f"no letter {result['no_letter']}); {groups}")
    print(json.dumps({"wall_s": round(wall, 1), "final": summary["final_eval_accuracy"], "long_4": long_4,
                      "long_5": long_5, "blank": blank["val/accuracy"], "by_question": by_question,
                      "eval": {name: result["accuracy"] for name, result in evaluated.items()}}))


if __name__ == "__main__":
    main()
