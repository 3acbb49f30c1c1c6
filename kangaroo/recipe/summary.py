"""A recipe's summary: ``summary.json``, the printed table and ``summary.png`` (loss across the
stages, held-out accuracy per stage)."""

from __future__ import annotations

import json
from typing import Any

from kangaroo import storage
from kangaroo.recipe.spec import Recipe, stage_dir
from kangaroo.training.stage import METRICS_NAME


def write_summary(recipe: Recipe, workdir: str, state: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for stage in recipe.stages:
        entry = state["stages"].get(stage.name, {})
        metrics = entry.get("metrics") or {}
        rows.append({"name": stage.name, "status": entry.get("status", "pending"), "steps": metrics.get("steps"),
                     "final_loss": metrics.get("final_loss"), "eval_accuracy": _number(metrics.get("eval_accuracy")),
                     "eval": metrics.get("eval", {}), "seconds": entry.get("seconds"),
                     "benchmarks": {name: result["accuracy"] for name, result in (entry.get("benchmarks") or {}).items()},
                     "model_folder": entry.get("model_folder")})
    done = [r for r in rows if r["status"] == "done" and r["eval_accuracy"] is not None]
    summary = {"recipe": recipe.name, "stages": rows, "final_eval_accuracy": done[-1]["eval_accuracy"] if done else None}
    storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    plot_summary(recipe, workdir, rows)
    return summary


def _number(value: Any) -> float | None:
    return None if value is None or value != value else float(value)  # nan -> None


def _or_nan(value: Any) -> float:
    number = _number(value)
    return float("nan") if number is None else number  # 0.0 is a point, not a gap


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
        accuracy_axis.plot(names, [_or_nan(r["eval"].get(group)) for r in rows], marker=".",
                           label=group.rsplit("/", 1)[-1])
    for name in sorted({name for r in rows for name in r["benchmarks"]}):
        accuracy_axis.plot(names, [_or_nan(r["benchmarks"].get(name)) for r in rows], marker="s",
                           linestyle="none", label=f"eval: {name}")
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
    for row in summary["stages"]:
        for name, accuracy in row.get("benchmarks", {}).items():
            lines.append(f"{row['name']} on {name} (kangaroo eval): {fmt(accuracy, '.3f')}")
        if row.get("model_folder"):
            lines.append(f"model folder of {row['name']}: {row['model_folder']}")
    return "\n".join(lines)
