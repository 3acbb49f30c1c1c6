"""The recipe runner: bad recipes refused before training, and the tiny recipe chained for real,
killed during stage 3 and finished by a second run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kangaroo.recipe import RecipeError, load_recipe, run_recipe
from recipes import SMALL_WORLD, TINY, chain_recipe, stage, write_recipe


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "config": "missing.yaml"}], "names config"),
    ([stage(1), stage(2, init_from="nope")], "unknown stage 'nope'"),
    ([stage(1, eval=[{"benchmark": "vmme", "data": "q.json"}])], r"unknown benchmark 'vmme'; known: \['egoschema'"),
    ([stage(1, eval=[{"benchmark": "videomme"}])], "needs a `benchmark` and `data`"),
    ([stage(1, init_from="2-video-pretrain"), stage(2)], "a later stage"),
    ([stage(1, init_from="2-video-pretrain"), stage(2, init_from="1-image-pretrain")], "a cycle"),
    ([stage(1, init_from="1-image-pretrain")], "initialises from itself"),
    ([stage(1), stage(1)], "duplicate stage name"),
])
def test_bad_recipes_are_refused_before_training(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", stages))


def test_missing_checkpoint_and_foreign_workdir_are_refused_before_training(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", [stage(1), stage(2, init_from="1-image-pretrain")]))
    with pytest.raises(RecipeError, match="does not exist; run that stage first"):
        run_recipe(recipe, str(tmp_path / "work"), only="2-video-pretrain")
    other = load_recipe(write_recipe(tmp_path / "other.yaml", [stage(1)], name="other"))
    with pytest.raises(RecipeError, match="belongs to recipe 'test-recipe'"):
        run_recipe(other, str(tmp_path / "work"))
    assert not list((tmp_path / "work").rglob("*.ckpt"))


def test_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_recipe(tmp_path / "sub" / "r.yaml", [{**stage(1), "config": os.path.relpath(TINY / "1-image-pretrain.yaml", tmp_path / "sub"),
                                                       "overrides": {"data.prepare.tokenizer": "${world}/tok"}}],
                        world="../world")
    recipe = load_recipe(path)
    assert recipe.world == str(tmp_path / "world")
    result = subprocess.run([sys.executable, "-m", "kangaroo.cli", "recipe", "show", path, "--workdir", str(tmp_path / "w")],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["1-image-pretrain"]["data"]["prepare"]["tokenizer"] == f"{tmp_path}/world/tok"
    assert shown["1-image-pretrain"]["trainer"]["default_root_dir"] == f"{tmp_path}/w/1-image-pretrain"


# -- the real chain --------------------------------------------------------------------------

def test_tiny_recipe_chain_survives_a_kill_during_stage_3(small_world, tmp_path):
    from safetensors.torch import load_file

    recipe_path = chain_recipe(tmp_path, small_world, stage3_steps=12)
    work = tmp_path / "work"
    command = [sys.executable, "-m", "kangaroo.cli", "recipe", "run", recipe_path, "--workdir", str(work)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    stage3 = work / "3-pretrain-refinement"
    while time.time() < deadline and not list(stage3.rglob("last*.ckpt")):
        assert first.poll() is None, "the runner ended before stage 3 wrote a checkpoint"
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # the runner and its stage process, as a preemption would
    first.wait()
    state = json.loads((work / "recipe-state.json").read_text())
    assert [state["stages"][n]["status"] for n in sorted(state["stages"])] == ["done", "done", "running", "pending", "pending"]
    done_before = {n: state["stages"][n]["metrics"] for n in ("1-image-pretrain", "2-video-pretrain")}
    weights_before = {n: (work / n / "model.safetensors").stat().st_mtime_ns for n in done_before}

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[3-pretrain-refinement] resuming from" in second.stdout
    assert "[1-image-pretrain]" not in second.stdout and "[2-video-pretrain]" not in second.stdout
    state = json.loads((work / "recipe-state.json").read_text())
    assert all(entry["status"] == "done" for entry in state["stages"].values())
    for name in done_before:  # not redone
        assert state["stages"][name]["metrics"] == done_before[name]
        assert (work / name / "model.safetensors").stat().st_mtime_ns == weights_before[name]
    assert state["stages"]["3-pretrain-refinement"]["metrics"]["steps"] == 12

    # Each stage started from the previous one's weights: the parts a stage freezes come out
    # exactly as the previous stage left them.
    weights = {n: load_file(work / n / "model.safetensors") for n in state["stages"]}
    llm = lambda w: {k: v for k, v in w.items() if k.startswith("language_model.")}  # noqa: E731
    for before, after in (("1-image-pretrain", "2-video-pretrain"), ("2-video-pretrain", "3-pretrain-refinement")):
        assert all(torch.equal(v, llm(weights[after])[k]) for k, v in llm(weights[before]).items())
    vision = lambda w: {k: v for k, v in w.items() if k.startswith("vision_tower.")}  # noqa: E731
    assert all(torch.equal(v, weights["5-long-video-tuning"][k]) for k, v in vision(weights["4-instruction-tuning"]).items())
    # Stage 4 trains everything: it starts from stage 3, so it ends near it, not near a fresh model.
    key = "projector.weight"
    moved = (weights["4-instruction-tuning"][key] - weights["3-pretrain-refinement"][key]).abs().max()
    assert moved < 0.1 < (weights["3-pretrain-refinement"][key]).abs().max() + 0.1

    summary = json.loads((work / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == sorted(state["stages"])
    assert all(s["steps"] and s["final_loss"] is not None and s["seconds"] is not None for s in summary["stages"])
    assert summary["final_eval_accuracy"] == summary["stages"][-1]["eval_accuracy"]
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    assert (work / "summary.png").stat().st_size > 10_000

    # The last stage is exported as a model folder and scored on both layouts of its held-out set.
    last = state["stages"]["5-long-video-tuning"]
    assert last["model_folder"] == str(work / "5-long-video-tuning" / "model")
    from kangaroo.inference import load_pretrained

    exported = load_pretrained(last["model_folder"]).model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in weights["5-long-video-tuning"].items())
    assert set(last["benchmarks"]) == {"held-out", "videomme"}
    for name, result in last["benchmarks"].items():
        assert result["scored"] == 12 and result["missing_media"] == 0, (name, result)
        assert set(result["categories"]) == ({"category"} if name == "held-out" else {"duration", "task_type", "domain"})
        assert sum(row["scored"] for row in next(iter(result["categories"].values())).values()) == 12
    assert summary["stages"][-1]["benchmarks"] == {n: r["accuracy"] for n, r in last["benchmarks"].items()}
    assert "5-long-video-tuning on videomme (kangaroo eval)" in second.stdout
    samples = (work / "5-long-video-tuning" / "eval" / "videomme" / "samples.jsonl").read_text().splitlines()
    assert json.loads(samples[0])["prompt"].startswith("Select the best answer to the following")

    # A done stage whose config changed is neither redone nor kept silently.
    text = Path(recipe_path).read_text().replace("trainer.max_steps: 12", "trainer.max_steps: 13")
    Path(recipe_path).write_text(text)
    changed = subprocess.run(command, capture_output=True, text=True)
    assert changed.returncode == 2 and "config changed" in changed.stderr and "--restart-from" in changed.stderr


def test_unknown_recipe_keys_are_named(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['stagez'\]"):
        load_recipe(write_recipe(tmp_path / "r.yaml", [stage(1)], stagez=[]))
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['overides'\]"):
        load_recipe(write_recipe(tmp_path / "r.yaml", [stage(1, overides={})]))


def test_synth_refuses_a_folder_holding_another_world(small_world):
    from kangaroo.world import WorldConfig, synthesize

    small = WorldConfig(**SMALL_WORLD)
    stamp = os.path.getmtime(os.path.join(small_world, "world.json"))
    first = synthesize(small_world, small)  # the session's world, made with these settings
    assert synthesize(small_world, small) == first  # same settings: reused, not redone
    assert os.path.getmtime(os.path.join(small_world, "world.json")) == stamp
    with pytest.raises(ValueError, match="other settings; pass --overwrite"):
        synthesize(small_world, WorldConfig(**{**SMALL_WORLD, "seed": 1}))
    lines = (Path(small_world) / "5-long-video-tuning-val.jsonl").read_text().splitlines()
    assert len(lines) == SMALL_WORLD["val_short"] + SMALL_WORLD["val_long"]
    assert all(json.loads(line)["video"].startswith("media/val/") for line in lines)  # held-out renders


def test_optional_stages_run_only_when_named_and_come_last(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", [stage(1), stage(2, init_from="1-image-pretrain", optional=True)])
    recipe = load_recipe(path)
    assert [s.name for s in recipe.selected().stages] == ["1-image-pretrain"]
    for name in ("video-pretrain", "2-video-pretrain"):  # the name, or the name without its number
        assert [s.name for s in recipe.selected([name]).stages] == ["1-image-pretrain", "2-video-pretrain"]
    with pytest.raises(RecipeError, match=r"--with \['image-pretrain'\] names no optional stage; optional stages "
                                          r"are \['2-video-pretrain'\]"):
        recipe.selected(["image-pretrain"])
    chained = load_recipe(write_recipe(tmp_path / "chained.yaml", [
        stage(1), stage(2, init_from="1-image-pretrain", optional=True),
        stage(3, init_from="2-video-pretrain", optional=True)]))
    with pytest.raises(RecipeError, match="starts from '2-video-pretrain', an optional stage not named"):
        chained.selected(["pretrain-refinement"])
    with pytest.raises(RecipeError, match="optional stages come after every stage that is not"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", [stage(1, optional=True), stage(2)]))
    shown = subprocess.run([sys.executable, "-m", "kangaroo.cli", "recipe", "show", path, "--with", "video-pretrain",
                            "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert list(yaml.safe_load(shown.stdout)) == ["1-image-pretrain", "2-video-pretrain"]


def test_the_world_writes_preference_pairs_with_one_fact_wrong(small_world):
    from kangaroo.data.manifest import OPTION_LETTERS

    pairs = {split: [json.loads(line) for line in (Path(small_world) / f"6-preference-{split}.jsonl").read_text()
                     .splitlines()] for split in ("train", "val")}
    held_out = [json.loads(line) for line in (Path(small_world) / "5-long-video-tuning-val.jsonl").read_text().splitlines()]
    assert len(pairs["val"]) == len(held_out) and all(p["video"].startswith("media/val/") for p in pairs["val"])
    assert {p["meta"]["wrong"] for p in pairs["train"]} == {"colour", "shape", "direction", "count", "when"}
    by_id = {q["id"]: q for q in held_out}
    for pair in pairs["val"]:
        question = by_id[pair["id"].removesuffix("-pair")]
        right = question["options"][OPTION_LETTERS.index(question["answer"])]
        assert pair["prompt"] == question["question"] and pair["chosen"] != pair["rejected"]
        assert right in pair["chosen"] and right not in pair["rejected"]
