"""The ``kangaroo`` entry point: every command's help and settings, and `model summary`."""

import json
import subprocess

import pytest

from kangaroo.modules import kangaroo_tiny
from kangaroo.modules.summary import model_summary


def kangaroo(*args, check=True):
    """``kangaroo ARGS`` in this process (the entry point's own ``main``; a subprocess would spend
    its seconds importing torch): its exit code and what it printed."""
    import contextlib
    import io

    from kangaroo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as done:
            code = done.code
    result = subprocess.CompletedProcess(["kangaroo", *args], code or 0, out.getvalue(), err.getvalue())
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
    summary = json.loads(kangaroo("model", "summary", "--stage", str(config), "--json").stdout)
    projector = (192 * 64 + 64) + (64 * 64 + 64)
    assert summary["parts"]["projector"] == {"params": projector, "trainable": projector}
    assert summary["parts"]["vision_tower"]["trainable"] == 0 and summary["parts"]["language_model"]["trainable"] == 0
    assert summary["trainable"] == projector + summary["parts"]["patchify"]["params"]
    assert summary["tokens_per_frame"] == 8


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  architecture:\n    vision_towr: {name: EVA02-L-14}\n")
    result = kangaroo("model", "summary", "--stage", str(config), check=False)
    assert result.returncode == 2
    assert "vision_towr" in result.stderr
    both = kangaroo("model", "summary", "--stage", str(config), "--model", "kangaroo-tiny", check=False)
    assert both.returncode == 2 and "give one or the other" in both.stderr


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
    commands = ("fit", "validate", "model", "data", "curate", "checkpoint", "export", "import", "chat", "serve", "demo",
                "eval", "recipe")
    for name in commands:
        assert f"\n    {name} " in listed, name
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage" in capsys.readouterr().out.lower(), name


def leaves(table=None, path=()):
    """Every command of ``kangaroo`` below the LightningCLI pair, as its words."""
    from kangaroo.cli import COMMANDS, FIT_COMMANDS

    for name, entry in (table or COMMANDS).items():
        if name == "_help" or (not path and name in FIT_COMMANDS):
            continue
        if isinstance(entry, dict):
            yield from leaves(entry, (*path, name))
        else:
            yield (*path, name)


def test_every_command_prints_its_settings_and_reads_them_back_from_config(capsys, tmp_path):
    import yaml

    from kangaroo.cli import main

    commands = list(leaves())
    assert len(commands) == 17, commands
    for words in commands:
        with pytest.raises(SystemExit) as done:
            main([*words, "--help"])
        assert done.value.code == 0, words
        assert "--print_config" in capsys.readouterr().out, words
        with pytest.raises(SystemExit) as done:
            main([*words, "--print_config"])
        assert done.value.code == 0, words
        printed = yaml.safe_load(capsys.readouterr().out)
        assert isinstance(printed, dict) and printed, words
        # the printed settings are a config file the command accepts: printed again, unchanged
        settings = tmp_path / f"{'-'.join(words)}.yaml"
        settings.write_text(yaml.safe_dump(printed))
        with pytest.raises(SystemExit) as done:
            main([*words, "--config", str(settings), "--print_config"])
        assert done.value.code == 0, words
        assert yaml.safe_load(capsys.readouterr().out) == printed, words


def test_earlier_spellings_of_flags_mean_what_they_meant(capsys):
    import yaml

    from kangaroo.cli import main

    def settings(*words):
        with pytest.raises(SystemExit) as done:
            main([*words, "--print_config"])
        assert done.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    served = settings("serve", "--model", "m", "--allowed-media-root", "/a", "--allowed-media-root", "/b",
                      "--allow-remote-media", "--batch-wait-ms", "5", "--max_batch=3")
    assert served["allowed_media_root"] == ["/a", "/b"] and served["allow_remote_media"] is True
    assert served["batch_wait_ms"] == 5.0 and served["max_batch"] == 3
    assert settings("serve", "--model", "m", "--allow-remote-media", "false")["allow_remote_media"] is False
    assert settings("serve", "--model", "m", "--allowed_media_root", "[/c, /d]")["allowed_media_root"] == ["/c", "/d"]
    # a bool flag alone before a positional argument, and `curate --manifest` as `curate filter`
    exported = settings("export", "--overwrite", "runs/stage", "--output", "out")
    assert exported["overwrite"] is True and exported["source"] == "runs/stage"
    assert settings("curate", "--manifest", "m.jsonl", "--output", "o.jsonl")["manifest"] == "m.jsonl"
    # several values of a positional list, before or after the options
    assert settings("curate", "merge", "a.jsonl", "b c.jsonl", "--output", "o.jsonl")["parts"] == ["a.jsonl", "b c.jsonl"]
    assert settings("curate", "merge", "--output", "o.jsonl", "a.jsonl")["parts"] == ["a.jsonl"]


def test_bad_settings_are_refused_with_the_option_named(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("model: m\nmax_batch: many\n")
    result = kangaroo("serve", "--config", str(bad), check=False)
    assert result.returncode == 2 and "max_batch" in result.stderr
    unknown = kangaroo("eval", "--model", "m", "--benchmark", "nonesuch", "--data", "d", "--output", "o", check=False)
    assert unknown.returncode == 2 and "benchmark" in unknown.stderr


def test_a_stage_file_given_as_a_commands_settings_is_refused_naming_the_flag_it_belongs_to(tmp_path):
    from pathlib import Path

    stage = Path(__file__).resolve().parents[1] / "configs" / "kangaroo-tiny" / "1-image-pretrain.yaml"
    old = kangaroo("data", "prepare", "--manifest", "m.jsonl", "--config", str(stage), check=False)
    assert old.returncode == 2 and "a stage file is --stage" in old.stderr
    broken = tmp_path / "stage.yaml"
    broken.write_text("model:\n  architecture: {base: nowhere.yaml}\n")
    fit = kangaroo("fit", "-c", str(broken), check=False)
    assert fit.returncode == 2 and "names the config file nowhere.yaml, which does not exist" in fit.stderr
    assert "Traceback" not in fit.stderr
    # help asked for after a positional list is help, not one more part
    assert "--output" in kangaroo("curate", "merge", "a.jsonl", "b.jsonl", "-h").stdout
