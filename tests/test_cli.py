"""The real ``kangaroo`` entry point, in a subprocess."""

import json
import subprocess
import sys

import pytest

from kangaroo.modules import kangaroo_tiny
from kangaroo.modules.summary import model_summary


def kangaroo(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "kangaroo.cli", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_summary_json_of_the_8b_model():
    summary = json.loads(kangaroo("model", "summary", "--model", "kangaroo-8b", "--json").stdout)
    assert set(summary["parts"]) == {"vision_tower", "temporal_embedding", "patchify", "projector", "language_model"}
    assert summary["total"] == sum(p["params"] for p in summary["parts"].values())
    assert summary["trainable"] == sum(p["trainable"] for p in summary["parts"].values())
    assert summary["tokens_per_frame"] == 128
    assert summary["parts"]["language_model"]["params"] == 8030261248


def test_summary_of_the_stage_1_shape():
    summary = json.loads(kangaroo("model", "summary", "--image-size", "224", "--no-patchify", "--json").stdout)
    assert summary["tokens_per_frame"] == 256
    assert summary["parts"]["patchify"] == {"params": 0, "trainable": 0}


def test_summary_table_lists_every_part():
    out = kangaroo("model", "summary", "--model", "kangaroo-tiny").stdout
    for part in ("vision_tower", "temporal_embedding", "patchify", "projector", "language_model", "total"):
        assert part in out
    assert "visual tokens per frame: 8" in out


def test_summary_from_a_yaml_config(tmp_path):
    config = tmp_path / "stage.yaml"
    config.write_text(
        "model:\n"
        "  architecture:\n"
        "    vision_tower: {name: 'timm:eva02_tiny_patch14_224', image_size: 112}\n"
        "    language_model:\n"
        "      transformers_config: {model_type: llama, vocab_size: 1024, hidden_size: 64, intermediate_size: 128,\n"
        "                            num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}\n"
        "    visual_tokens: {placeholder: 1019, vi_start: 1020, eof: 1021, eov: 1022, vi_end: 1023}\n"
        "    patchify: {kernel: [2, 2, 2]}\n"
        "    projector: {kind: mlp}\n"
        "  trainable: {vision_tower: false, patchify: true, projector: true, language_model: false}\n"
    )
    summary = json.loads(kangaroo("model", "summary", "--config", str(config), "--json").stdout)
    projector = (192 * 64 + 64) + (64 * 64 + 64)
    assert summary["parts"]["projector"] == {"params": projector, "trainable": projector}
    assert summary["parts"]["vision_tower"]["trainable"] == 0 and summary["parts"]["language_model"]["trainable"] == 0
    assert summary["trainable"] == projector + summary["parts"]["patchify"]["params"]
    assert summary["tokens_per_frame"] == 8


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  architecture:\n    vision_towr: {name: EVA02-L-14}\n")
    result = kangaroo("model", "summary", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "vision_towr" in result.stderr


def test_summary_counts_frozen_parameters():
    model = kangaroo_tiny()
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    summary = model_summary(model)
    vision = summary["parts"]["vision_tower"]
    assert vision["trainable"] == 0 and vision["params"] > 0
    assert summary["trainable"] == summary["total"] - vision["params"]


def test_a_stage_file_naming_a_missing_model_file_is_a_clear_error(tmp_path):
    from kangaroo.training.stage_file import load_stage_file

    config = tmp_path / "stage.yaml"
    config.write_text("model:\n  architecture:\n    language_model: nowhere.yaml\n")
    with pytest.raises(ValueError, match=r"model.architecture.language_model names the config file nowhere.yaml, "
                                         r"which does not exist"):
        load_stage_file(str(config), ("model",))


def test_help_lists_every_command_and_each_answers_its_own_help(capsys):
    from kangaroo.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    commands = ("fit", "validate", "model", "data", "curate", "checkpoint", "export", "chat", "serve", "demo", "eval",
                "recipe")
    for name in commands:
        assert f"\n    {name} " in listed, name
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage" in capsys.readouterr().out.lower(), name
