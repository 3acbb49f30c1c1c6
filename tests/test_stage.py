"""The stage LightningModule: trainable spec, optimizer groups, schedule, init_from, and every
tiny stage config fitted for real on prepared data, each from the previous stage's weights."""

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_video
from kangaroo.modules import kangaroo_tiny
from kangaroo.training.freezing import apply_trainable
from kangaroo.modules.loss import first_answer_tokens
from kangaroo.training.optim import OptimizerConfig, parameter_groups, warmup_cosine
from kangaroo.training.weights import load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted((ROOT / "configs" / "kangaroo-tiny").glob("[1-9]-*.yaml"))  # stage files, not the shared model parts
CURRICULUM = [path for path in TINY if path.stem[0] in "12345"]  # the five stages, not the optional ones after
BIG = sorted((ROOT / "configs" / "kangaroo-8b").glob("[1-9]-*.yaml"))
ALL_TRAINABLE = {"vision_tower": True, "patchify": True, "projector": True, "language_model": True}


# -- trainable spec ------------------------------------------------------------------------------

def test_trainable_spec_freezes_parts_and_patterns():
    model = kangaroo_tiny()
    rows = apply_trainable(model, {"vision_tower": False, "patchify": True, "projector": True, "language_model": False},
                           {"language_model.model.embed_tokens.*": True})
    table = {r["part"]: r for r in rows}
    assert table["vision_tower"]["trainable"] == 0 < table["vision_tower"]["params"]
    assert table["projector"]["trainable"] == table["projector"]["params"]
    assert table["language_model"]["trainable"] == model.language_model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("spec, patterns, message", [
    ({"vision_tower": True, "projecter": True}, None, "unknown part(s) ['projecter']"),
    ({**ALL_TRAINABLE, "patchify": True}, {"language_model.nope.*": False}, "'language_model.nope.*' matches no parameter"),
    ({"vision_tower": True, "projector": True}, None, "does not say whether ['patchify', 'language_model']"),
])
def test_trainable_spec_errors_name_the_entry(spec, patterns, message):
    with pytest.raises(ValueError) as err:
        apply_trainable(kangaroo_tiny(), spec, patterns)
    assert message in str(err.value)


def test_absent_part_in_the_spec_is_an_error():
    with pytest.raises(ValueError, match="part 'patchify' has no parameters in this model"):
        apply_trainable(kangaroo_tiny(image_size=56, patchify=False), ALL_TRAINABLE)


# -- optimizer ----------------------------------------------------------------------------------

def test_parameter_groups_cover_every_trainable_parameter_once_with_the_paper_rules():
    model = kangaroo_tiny()
    apply_trainable(model, {**ALL_TRAINABLE, "vision_tower": True})
    config = OptimizerConfig(lr=1e-3, layer_decay=0.9)
    groups = parameter_groups(model, config)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, param in named.items():
        group = by_param[id(param)]
        no_decay = (param.ndim <= 1 or "embed_tokens" in name or name.endswith(("pos_embed", "cls_token")))
        assert (group["weight_decay"] == 0.0) == no_decay, name
    trunk = "vision_tower.trunk."
    scale = lambda n: by_param[id(named[trunk + n])]["lr_scale"]  # noqa: E731
    blocks = len(model.vision_tower.trunk.blocks)
    for i in range(blocks - 1):
        assert scale(f"blocks.{i}.mlp.fc1_g.weight" if f"{trunk}blocks.{i}.mlp.fc1_g.weight" in named
                     else f"blocks.{i}.attn.proj.weight") == pytest.approx(
            0.9 * scale(f"blocks.{i + 1}.attn.proj.weight"))
    top = scale(f"blocks.{blocks - 1}.attn.proj.weight")  # 1, or 0.9 under a head norm of its own
    assert top in (pytest.approx(1.0), pytest.approx(0.9))
    assert scale("patch_embed.proj.weight") == pytest.approx(0.9 ** blocks * top), "one step below block 0"
    assert by_param[id(named["projector.weight"])]["lr"] == pytest.approx(1e-3)


def test_frozen_vision_tower_has_no_groups():
    model = kangaroo_tiny()
    apply_trainable(model, {**ALL_TRAINABLE, "vision_tower": False})
    groups = parameter_groups(model, OptimizerConfig())
    assert not [g for g in groups if g["name"].startswith("vision_tower")]


def test_warmup_then_cosine_to_the_minimum():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.01) for s in range(111)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.505) and lrs[110] == pytest.approx(0.01)


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerConfig(lr=1e-6, min_lr=1e-5)


# -- init_from ----------------------------------------------------------------------------------

def test_init_from_a_stage_without_patchify_resamples_positions_and_keeps_new_parts(tmp_path):
    torch.manual_seed(0)
    before = kangaroo_tiny(image_size=56, patchify=False)
    path = save_weights(before, str(tmp_path / "model.safetensors"))
    after = kangaroo_tiny(image_size=112)
    patchify = after.patchify.conv.weight.detach().clone()
    with pytest.raises(ValueError) as err:
        load_weights(after, path)
    assert "missing from the file: 2 key(s): patchify.conv.weight, patchify.conv.bias" in str(err.value)
    loaded = load_weights(after, path, new_parts=["patchify"])
    assert sorted(loaded["new"]) == ["patchify.conv.bias", "patchify.conv.weight"]
    assert loaded["resized"] == ["vision_tower.trunk.pos_embed (1, 17, 192) -> (1, 65, 192)"]
    assert torch.equal(after.patchify.conv.weight, patchify)  # kept its uniform initialisation
    assert torch.equal(after.projector.weight, before.projector.weight)
    assert torch.equal(after.language_model.lm_head.weight, before.language_model.lm_head.weight)
    assert torch.equal(after.vision_tower.trunk.pos_embed[:, 0], before.vision_tower.trunk.pos_embed[:, 0])


def test_init_from_a_different_model_lists_what_does_not_match(tmp_path):
    from kangaroo.modules import build_kangaroo, kangaroo_tiny_config

    config = kangaroo_tiny_config()
    config.language_model.transformers_config["hidden_size"] = 64
    config.language_model.transformers_config["intermediate_size"] = 128
    path = save_weights(build_kangaroo(config), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError) as err:
        load_weights(kangaroo_tiny(), path)
    assert "shape mismatch" in str(err.value) and "language_model.model.embed_tokens.weight" in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(kangaroo_tiny(), str(tmp_path / "nope.safetensors"))


def test_init_from_reads_a_lightning_checkpoint_weights_only(tmp_path):
    model = kangaroo_tiny()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1},
               tmp_path / "last.ckpt")
    fresh = kangaroo_tiny()
    load_weights(fresh, str(tmp_path / "last.ckpt"))
    assert torch.equal(fresh.projector.weight, model.projector.weight)
    torch.save({"state_dict": {}, "opaque": argparse.Namespace(a=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        load_weights(fresh, str(tmp_path / "pickled.ckpt"))


# -- greedy answers -----------------------------------------------------------------------------

def test_first_answer_tokens_in_a_packed_row_match_each_sample_alone(tiny_model):
    from conftest import collate, make_sample

    samples = [make_sample(tiny_model, frames=2, text_len=3, seed=s) for s in range(3)]
    with torch.no_grad():
        batch = collate(samples)
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values", "timestamps", "frame_counts")}
        hidden = tiny_model.hidden_states(**inputs)
        packed, targets = first_answer_tokens(hidden, batch["labels"], tiny_model.output_head, batch["position_ids"])
        alone = []
        for sample in samples:
            one = collate([sample])
            h = tiny_model.hidden_states(**{k: one[k] for k in inputs})
            alone.append(tiny_model.output_head(h[0, len(sample.input_ids) - 4]).argmax())
    assert targets.tolist() == [s.labels[-3] for s in samples]
    assert packed.tolist() == [int(a) for a in alone]


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", TINY + BIG, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_config_parses_and_instantiates(path):
    from kangaroo.training.fit import KangarooCLI

    args = ["--config", str(path)]
    if "8b" in path.parent.name:
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    cli = KangarooCLI(args=args, run=False)
    if "8b" in path.parent.name:  # sharded, with the activation memory plan of docs/memory.md
        from kangaroo.training.fsdp import FSDP2Strategy

        strategy = cli.trainer.strategy
        assert isinstance(strategy, FSDP2Strategy) and strategy.activation_checkpointing["language_model"]
        assert strategy.param_dtype == "bfloat16" and strategy.reduce_dtype == "float32"
        assert cli.model.architecture.language_model.torch_dtype == "float32", "fp32 master weights"
    assert path.read_text().startswith(f"# kangaroo fit --config configs/{path.parent.name}/{path.name}")
    device = torch.device("meta") if "8b" in path.parent.name else torch.device("cpu")
    cli.model.load_pretrained = False
    cli.model.init_from = None
    with device:
        cli.model.configure_model()
    assert cli.model.model.num_visual_tokens(16 if cli.model.model.patchify else 8) > 0
    assert cli.datamodule.prepare.max_tokens == cli.datamodule.hparams.max_tokens


PRINTED = Path(__file__).resolve().parent / "data" / "print_config"
ADDED_SINCE = {("model", "adapters"): None, ("model", "preference"): None}  # options the stage gained after the stored copies, with their defaults


@pytest.mark.parametrize("path", TINY + BIG, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_stage_names_its_models_parts_once_and_prints_the_whole_stage_as_before(path, capsys):
    import yaml

    from kangaroo.cli import main

    # the stage file states only what its stage changes; the parts live in architecture.yaml
    architecture = yaml.safe_load(path.read_text())["model"]["architecture"]
    if isinstance(architecture, dict):
        assert architecture["base"] == "architecture.yaml", path
        assert not {"visual_tokens", "projector", "language_model"} & set(architecture), path
        assert "name" not in (architecture.get("vision_tower") or {}), path
    else:
        assert architecture == "architecture.yaml", path
    # ... and `kangaroo fit --print_config` shows the whole stage, key for key as when each stage
    # file spelled out every part (the copies in tests/data/print_config were printed then)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    stored = yaml.safe_load((PRINTED / f"{path.parent.name}-{path.name}").read_text())
    for (section, key), default in ADDED_SINCE.items():  # options added after a copy was printed: at their defaults
        if key not in stored[section]:
            assert printed[section].pop(key) == default, (section, key)
    assert printed == stored


def test_a_base_file_is_merged_key_by_key_and_a_missing_one_is_named(tmp_path):
    from kangaroo.training.stage_file import fit_arguments, read_stage_yaml

    (tmp_path / "parts.yaml").write_text("vision_tower: {name: tower, image_size: 112, drop_path: 0.1}\n"
                                         "patchify: {kernel: [2, 2, 2]}\nprojector: {kind: linear}\n")
    stage = tmp_path / "stage.yaml"
    stage.write_text("model:\n  architecture: {base: parts.yaml, vision_tower: {image_size: 56}, patchify: null}\n")
    assert read_stage_yaml(str(stage))["model"]["architecture"] == {
        "vision_tower": {"name": "tower", "image_size": 56, "drop_path": 0.1}, "patchify": None,
        "projector": {"kind": "linear"}}
    plain = tmp_path / "plain.yaml"  # naming no other file: jsonargparse reads it (and reports on it) itself
    plain.write_text("model:\n  architecture: {vision_tower: {name: tower}}\n")
    assert fit_arguments(["fit", "--config", str(plain)]) == ["fit", "--config", str(plain)], "a plain file kept"
    given = fit_arguments(["fit", f"--config={stage}", "--trainer.max_steps=2"])
    assert given[0] == "fit" and given[3] == "--trainer.max_steps=2" and "image_size: 56" in given[2]
    stage.write_text("model:\n  architecture: {base: nowhere.yaml}\n")
    with pytest.raises(ValueError, match="model.architecture.base names the config file nowhere.yaml"):
        read_stage_yaml(str(stage))


def test_an_architecture_naming_a_size_gets_its_numbers_from_sizes_py(tmp_path):
    """``size: NAME`` stands for the named model's parts (kangaroo.modules.sizes, the one place
    with their numbers); the file's other keys are merged over them; an unknown size is named."""
    from kangaroo.modules.sizes import ARCHITECTURES, TINY_LLAMA
    from kangaroo.training.stage_file import fit_arguments, read_stage_yaml

    (tmp_path / "parts.yaml").write_text("size: kangaroo-tiny\nlanguage_model: {pretrained: llm}\n")
    stage = tmp_path / "stage.yaml"
    stage.write_text("model:\n  architecture: {base: parts.yaml, vision_tower: {image_size: 56}}\n")
    architecture = read_stage_yaml(str(stage))["model"]["architecture"]
    assert architecture["language_model"] == {"pretrained": "llm", "transformers_config": TINY_LLAMA}
    assert architecture["vision_tower"] == {**ARCHITECTURES["kangaroo-tiny"]["vision_tower"], "image_size": 56}
    assert ARCHITECTURES["kangaroo-tiny"]["vision_tower"]["image_size"] == 112, "the named size is not changed"
    named = tmp_path / "named.yaml"  # a stage naming the file as it is: jsonargparse gets the parts
    named.write_text("model:\n  architecture: parts.yaml\n")
    assert "num_hidden_layers: 4" in fit_arguments(["fit", "--config", str(named)])[2]
    elsewhere = tmp_path / "elsewhere.yaml"  # a key named size outside model.architecture is nobody's size
    elsewhere.write_text("model:\n  architecture: parts.yaml\ndata:\n  init_args: {size: large}\n")
    assert read_stage_yaml(str(elsewhere))["data"] == {"init_args": {"size": "large"}}
    (tmp_path / "parts.yaml").write_text("size: kangaroo-huge\n")
    with pytest.raises(ValueError, match=r"size: unknown model size 'kangaroo-huge'; known: \['kangaroo-8b'"):
        read_stage_yaml(str(stage))


EXPECTED_TRAINABLE = {
    "1-image-pretrain": {"vision_tower", "projector"}, "2-video-pretrain": {"vision_tower", "projector"},
    "3-pretrain-refinement": {"vision_tower", "patchify", "projector"},
    "4-instruction-tuning": {"vision_tower", "patchify", "projector", "language_model"},
    "5-long-video-tuning": {"patchify", "projector", "language_model"},
    "4-instruction-tuning-lora": {"vision_tower", "patchify", "projector", "language_model"},  # adapters on two
    "5-long-video-tuning-lora": {"patchify", "projector", "language_model"},  # adapters on the LLM
    "6-preference-lora": {"language_model"},  # adapters alone: the reference is the model with them off
}


@pytest.mark.parametrize("path", BIG, ids=lambda p: p.name)
def test_8b_summary_shows_the_trainable_parts_of_each_stage(path):
    import yaml

    from kangaroo.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["model", "summary", "--stage", str(path), "--json"]) == 0
    parts = json.loads(out.getvalue())["parts"]
    trained = {name for name, counts in parts.items() if counts["trainable"]}
    assert trained == EXPECTED_TRAINABLE[path.stem]
    adapted = set(yaml.safe_load(path.read_text())["model"].get("adapters") or {})
    for name in trained:
        if name in adapted:  # its adapters alone: a few percent of the part (r 16 on the ViT, r 64 on the LLM)
            assert 0 < parts[name]["trainable"] < 0.06 * parts[name]["params"], (name, parts[name])
        else:
            assert parts[name]["trainable"] == parts[name]["params"]


def test_unknown_yaml_key_fails_before_training(tmp_path, capsys):
    from kangaroo.training.fit import KangarooCLI

    bad = tmp_path / "bad.yaml"
    for name in ("architecture.yaml",):  # the file the stage names, beside it
        shutil.copy(TINY[0].with_name(name), tmp_path)
    bad.write_text(TINY[0].read_text().replace("  packing: false", "  packing: false\n  shufle: true"))
    with pytest.raises(SystemExit):
        KangarooCLI(args=["--config", str(bad)], run=False)
    assert "shufle" in capsys.readouterr().err


# -- fitting every tiny stage, chained --------------------------------------------------------------

CAPTIONS = ["A red circle moves left.", "A blue square appears.", "A green circle moves right.",
            "A red square disappears.", "A blue circle appears.", "A green square moves left."]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir):
    """Prepares a small dataset for each tiny stage with that stage's own ``data.prepare``."""
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout

    root = tmp_path_factory.mktemp("stage-data")
    (root / "media").mkdir()
    lines = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / "media" / f"i{i}.png")
        random_video(root / "media" / f"v{i}.mp4", frames=30 + 10 * i, fps=10, seed=i)
        lines.append({"id": f"i{i}", "image": f"media/i{i}.png", "task": "caption", "caption": caption})
        lines.append({"id": f"v{i}", "video": f"media/v{i}.mp4", "task": "caption", "caption": caption})
        lines.append({"id": f"q{i}", "video": f"media/v{i}.mp4", "task": "mcq", "question": "Which shape?",
                      "options": ["circle", "square", "triangle", "star"], "answer": "AB"[i % 2],
                      "meta": {"category": "long" if i > 3 else "short"}})
    for name, kinds in (("images", "i"), ("videos", "vq")):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in lines if x["id"][0] in kinds) + "\n")
    dirs = {}
    for path in CURRICULUM:
        data = load_stage_file(str(path), ("model", "data"))
        data["data"].prepare.tokenizer = tiny_tokenizer_dir
        dirs[path.stem] = str(root / path.stem)
        prepare_dataset(str(root / ("images.jsonl" if path.stem.startswith("1") else "videos.jsonl")), dirs[path.stem],
                        data["data"].prepare, visual_layout(data["model"].architecture))
    llm = root / "llm"
    from transformers import LlamaConfig, LlamaForCausalLM

    from kangaroo.modules.sizes import TINY_LLAMA

    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})).save_pretrained(llm)
    import timm
    from safetensors.torch import save_file

    vision = root / "vision.safetensors"  # a pre-trained tower for stage 1, in timm's key names
    tower = timm.create_model("eva02_tiny_patch14_224", img_size=56, num_classes=0, depth=4, global_pool="token")
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, vision)
    return dirs, str(llm), str(vision), tiny_tokenizer_dir


def losses(log_dir: Path) -> list[float]:
    (metrics,) = log_dir.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_every_tiny_stage_fits_from_the_previous_one_and_its_loss_falls(prepared, tmp_path):
    from safetensors.torch import load_file

    from kangaroo.training.fit import KangarooCLI

    dirs, llm, vision, tokenizer = prepared
    previous = None
    for path in CURRICULUM:
        run = tmp_path / path.stem
        args = ["--config", str(path), "--trainer.max_steps=12", "--trainer.val_check_interval=12",
                "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={run}",
                f"--trainer.logger.init_args.save_dir={run}", "--trainer.enable_progress_bar=false",
                f"--data.train_dir={dirs[path.stem]}", f"--data.val_dir={dirs[path.stem]}",
                f"--data.prepare.tokenizer={tokenizer}", "--model.optimizer.lr=2e-3", "--model.optimizer.warmup_steps=0"]
        if previous is None:
            args += [f"--model.architecture.language_model.pretrained={llm}",
                     f"--model.architecture.vision_tower.pretrained={vision}"]
        else:
            args.append(f"--model.init_from={previous}")
        cli = KangarooCLI(args=args, run=False)
        cli.model.configure_model()
        if previous is None:  # stage 1 starts from the pre-trained tower
            tower = load_file(vision)
            own = cli.model.model.vision_tower.trunk.state_dict()
            assert set(own) == set(tower)
            assert all(torch.equal(own[k], tower[k]) for k in tower)
        if previous is not None:  # started from the previous stage's weights
            before = load_file(previous)
            own = cli.model.model.state_dict()
            assert torch.equal(own["projector.weight"], before["projector.weight"])
            assert torch.equal(own["language_model.lm_head.weight"], before["language_model.lm_head.weight"])
        frozen = {n: p.detach().clone() for n, p in cli.model.model.named_parameters() if not p.requires_grad}
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        curve = losses(run)
        assert len(curve) == 12
        assert np.mean(curve[-3:]) < np.mean(curve[:3]), (path.stem, curve)
        for name, value in frozen.items():  # frozen parts did not move
            assert torch.equal(dict(cli.model.model.named_parameters())[name], value), name
        assert not np.isnan(cli.trainer.callback_metrics["val/loss"].item())
        accuracy = cli.trainer.callback_metrics["val/accuracy"].item()
        if path.stem.startswith("1"):
            assert np.isnan(accuracy)  # image captions only: no question to score, and no made-up number
        else:
            assert 0.0 <= accuracy <= 1.0
            assert 0.0 <= cli.trainer.callback_metrics["val/accuracy/long"].item() <= 1.0
        previous = str(run / "model.safetensors")
        assert Path(previous).exists()


def test_print_config_runs_again_unchanged_and_fits(prepared, tmp_path):
    import subprocess
    import sys

    dirs, llm, vision, tokenizer = prepared
    stage = TINY[1]
    overrides = [f"--data.train_dir={dirs[stage.stem]}", f"--data.val_dir={dirs[stage.stem]}",
                 f"--data.prepare.tokenizer={tokenizer}", f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.init_from=null"]

    def kangaroo(*args):
        result = subprocess.run([sys.executable, "-m", "kangaroo.cli", *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    printed = tmp_path / "printed.yaml"
    printed.write_text(kangaroo("fit", "--config", str(stage), *overrides, "--print_config"))
    assert kangaroo("fit", "--config", str(printed), "--print_config") == printed.read_text()
    kangaroo("fit", "--config", str(printed), "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    assert (tmp_path / "model.safetensors").exists()
    assert list(tmp_path.rglob("config.yaml"))  # LightningCLI saved the config of the run


def test_checkpoints_keep_one_loss_per_optimizer_step_and_last_links_the_newest(prepared, tmp_path):
    """With accumulation the stage's loss history grows per optimizer step, not per micro-batch,
    and ``last.ckpt`` (``save_last: link`` in every stage config) is a link, not a second copy."""
    import os

    import torch

    from kangaroo.training.fit import KangarooCLI

    dirs, _, _, tokenizer = prepared
    stage = TINY[1]
    KangarooCLI(args=["fit", "--config", str(stage), "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2",
                      "--trainer.val_check_interval=8", "--trainer.callbacks.every_n_train_steps=2",
                      f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                      "--trainer.enable_progress_bar=false", f"--data.train_dir={dirs[stage.stem]}",
                      f"--data.val_dir={dirs[stage.stem]}", f"--data.prepare.tokenizer={tokenizer}",
                      "--model.init_from=null"])
    history = json.loads((tmp_path / "stage-metrics.json").read_text())["loss_history"]
    assert [step for step, _ in history] == [1, 2, 3, 4], "one entry per optimizer step over 8 micro-batches"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last).endswith("step=4.ckpt"), os.readlink(last)
    assert len(torch.load(last, weights_only=True)["loss_history"]) == 4


def test_samples_past_the_position_limit_are_refused_unless_the_stage_states_a_rope_choice(prepared, tmp_path):
    """Stage 5's shape: rows longer than the LLM's max_position_embeddings. Without a choice the
    fit stops before the first step (before init_from is even read), naming both numbers; with
    Llama-3.1-style RoPE scaling stated in language_model_overrides it trains."""
    from kangaroo.modules.sizes import TINY_LLAMA
    from kangaroo.training.fit import KangarooCLI

    dirs, _, _, tokenizer = prepared
    stage = TINY[4]
    common = ["fit", "--config", str(stage), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              f"--data.train_dir={dirs[stage.stem]}", f"--data.val_dir={dirs[stage.stem]}",
              f"--data.prepare.tokenizer={tokenizer}"]
    with pytest.raises(ValueError, match=r"data.prepare.max_tokens lets a sample reach 1024 positions, past the "
                                         r"language model's limit of 256 \(max_position_embeddings; rope_type default"):
        KangarooCLI(args=[*common, "--model.init_from=/nonexistent/weights.safetensors",
                          '--model.architecture.language_model_overrides={"max_position_embeddings": 256}'])
    assert not (tmp_path / "model.safetensors").exists()
    scaled = {"max_position_embeddings": 1024, "rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}}
    cli = KangarooCLI(args=[*common, "--model.init_from=null",
                            f"--model.architecture.language_model_overrides={json.dumps(scaled)}"])
    llm = cli.model.model.language_model
    assert llm.config.max_position_embeddings == 1024 and llm.config.rope_parameters["rope_type"] == "llama3"
    from transformers import LlamaConfig

    default = type(llm.model.rotary_emb)(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    assert not torch.allclose(llm.model.rotary_emb.inv_freq, default.inv_freq), "the scaled RoPE is the one used"
    assert json.loads((tmp_path / "stage-metrics.json").read_text())["steps"] == 2


def test_the_position_check_reads_the_sample_budget_not_the_row_budget():
    """Samples of at most ``data.prepare.max_tokens`` packed into longer rows: positions restart
    per sample, so only the sample budget meets the LLM's limit."""
    from types import SimpleNamespace

    from fsdp_worker import architecture

    from kangaroo.data.datamodule import KangarooDataModule
    from kangaroo.data.encode import PrepareConfig
    from kangaroo.training.stage import KangarooStage, check_positions

    stage = KangarooStage(architecture(), trainable={"vision_tower": False, "patchify": True, "projector": True,
                                                     "language_model": True})
    limit = (8192, "rope_type default")
    for prepare, expected in ((4096, (4096, "data.prepare.max_tokens lets a sample reach")),
                              (None, (16384, "data.max_tokens lets a sample reach"))):
        data = KangarooDataModule("unused", max_tokens=16384, packing=True,
                                  prepare=PrepareConfig(tokenizer="unused", max_tokens=prepare) if prepare else None)
        stage._trainer = SimpleNamespace(datamodule=data)
        assert stage._longest_sample() == expected
    check_positions(4096, "data.prepare.max_tokens lets a sample reach", limit)  # 16K rows of 4K samples: fine
    with pytest.raises(ValueError, match="lets a sample reach 16384 positions, past the language model's limit of 8192"):
        check_positions(16384, "data.max_tokens lets a sample reach", limit)


def test_tiny_stage_4_on_two_sharded_processes_trains_and_validates(prepared, tmp_path):
    """The user's path at scale, on CPU: the tiny stage-4 config on data prepared by its own
    ``data.prepare`` (videos and questions, packed), 2 processes under FSDP2 with patchify,
    accumulation and validation on, where ranks hold different numbers of media items and of
    validation batches."""
    import sys

    from runs import run

    dirs, _, _, tokenizer = prepared
    stage = TINY[3]
    assert stage.stem == "4-instruction-tuning"
    run([sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(stage), "--trainer.devices=2",
         "--trainer.strategy.class_path=kangaroo.training.fsdp.FSDP2Strategy",
         "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2",
         "--trainer.val_check_interval=4", "--trainer.callbacks.every_n_train_steps=2",
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.enable_progress_bar=false", f"--data.train_dir={dirs[stage.stem]}",
         f"--data.val_dir={dirs[stage.stem]}", f"--data.prepare.tokenizer={tokenizer}", "--model.init_from=null"],
        timeout=420)
    metrics = json.loads((tmp_path / "stage-metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["loss_history"]) == 4
    assert all(np.isfinite(loss) for _, loss in metrics["loss_history"])
    assert metrics["eval"]["val/loss"] is not None and metrics["eval_accuracy"] is not None, metrics["eval"]
    assert (tmp_path / "model.safetensors").exists()
    (checkpoint,) = (tmp_path / "checkpoints").glob("*step=4.ckpt")  # epoch=E-step=4: the small set repeats
    assert (checkpoint / "COMPLETE").exists(), "a sharded checkpoint, whole"
