"""FSDP2 sharding (kangaroo.training.fsdp) on CPU processes with gloo: the same training as one
process, text-only ranks beside video ranks, sharded checkpoints that resume exactly and
consolidate into weights one process loads."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kangaroo.training.checkpoints import COMPLETE_MARKER, latest_checkpoint
from kangaroo.modules import kangaroo_tiny
from kangaroo.training.fsdp import apply_activation_checkpointing, shard_model
from runs import (FSDP, WORKER, assert_same_run, assert_same_weights, fit_command, kill_at_a_random_step, run,
                  steps_of)

STEPS = 12  # a multiple of the checkpoint interval (3): the last checkpoint holds the final weights


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """tests/fsdp_worker.py on 1 process (plain), on 2 (FSDP2 with activation checkpointing), and
    on 2 computing in bf16 (FSDP2's mixed precision, as on GPUs)."""
    outputs = {}
    for key, devices, dtype in ((1, 1, "auto"), (2, 2, "auto"), ("bf16", 2, "bfloat16")):
        out = tmp_path_factory.mktemp(f"worker-{key}")
        run([sys.executable, str(WORKER), "--devices", str(devices), "--out", str(out), "--param-dtype", dtype],
            timeout=240)
        outputs[key] = out
    return outputs


def test_two_sharded_processes_follow_the_one_process_loss_curve(worker_runs):
    one, two = (json.loads((worker_runs[n] / "losses.json").read_text()) for n in (1, 2))
    assert len(one) == len(two) == 6
    assert one[-1] < one[0] - 0.5, f"the runs train: {one}"
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert_same_weights(worker_runs[2], worker_runs[1])


def test_bf16_compute_follows_the_fp32_loss_curve(worker_runs):
    """bf16 gathered weights with fp32 master weights and reductions (the 8B configs' setting)."""
    fp32, bf16 = (json.loads((worker_runs[key] / "losses.json").read_text()) for key in (1, "bf16"))
    # bf16 keeps 8 significant bits (a relative rounding of 2**-8 = 0.4%); six steps of updates in
    # it stay within about two of those of the fp32 curve, whatever the loss's own scale
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=1e-2, atol=0)
    assert bf16 != fp32, "the bf16 run computed in bf16"
    assert load_file(worker_runs["bf16"] / "model.safetensors")["projector.weight"].dtype == torch.float32


def test_a_text_only_rank_beside_a_video_rank_finishes_its_steps(worker_runs):
    media = {rank: json.loads((worker_runs[2] / f"media.rank{rank}.json").read_text()) for rank in (0, 1)}
    assert media[0] == [0, 1, 2, 3, 4, 5]
    assert media[1] == [0, 2, 3, 5], "rank 1 had text only at steps 1 and 4"
    assert len(json.loads((worker_runs[2] / "losses.json").read_text())) == 6, "every step finished"


def test_ranks_holding_different_numbers_of_media_items_train_like_one_process(tmp_path):
    """Patchify is sharded like every part: ranks with 0, 1 and 3 media items (text-only rows,
    images and clips of 2 and 4 frames) in the same steps issue the same collectives, and the
    run ends with the weights of one process holding every row."""
    outs = {}
    for devices in (1, 2):
        outs[devices] = tmp_path / f"mix-{devices}"
        run([sys.executable, str(WORKER), "--devices", str(devices), "--out", str(outs[devices]), "--media-mix"],
            timeout=240)
    counts = [json.loads((outs[2] / f"media_counts.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert counts == [[0, 1, 3, 0, 1, 3], [3, 0, 1, 3, 0, 1]]
    one, two = (json.loads((outs[n] / "losses.json").read_text()) for n in (1, 2))
    assert len(one) == len(two) == 6
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert_same_weights(outs[2], outs[1])


def test_accumulated_micro_batches_weigh_by_tokens_like_one_batch(tmp_path):
    """An optimizer step over micro-batches (and processes) whose answers hold 1 to 40 tokens
    trains like one batch holding them all: the same loss, gradient norm and weights. The
    mean of per-micro-batch means (one 3-token micro-batch weighing as much as a 60-token
    one) gives a gradient norm about 2.5 times this one."""
    runs = {}
    for devices, accumulate, strategy in ((1, 1, "fsdp2"), (1, 2, "fsdp2"), (2, 2, "fsdp2"), (2, 2, "ddp")):
        out = tmp_path / f"{devices}x{accumulate}-{strategy}"
        run([sys.executable, str(WORKER), "--devices", str(devices), "--accumulate", str(accumulate),
             "--strategy", strategy, "--steps", "3", "--out", str(out)], timeout=240)
        runs[devices, accumulate, strategy] = out
    reference = runs.pop((1, 1, "fsdp2"))
    one = {name: json.loads((reference / name).read_text()) for name in ("losses.json", "grad_norms.json")}
    assert len(one["losses.json"]) == len(one["grad_norms.json"]) == 3
    for key, out in runs.items():
        for name, expected in one.items():
            torch.testing.assert_close(torch.tensor(json.loads((out / name).read_text())), torch.tensor(expected),
                                       rtol=1e-4, atol=0, msg=lambda m: f"{key} {name}: {m}")
        assert_same_weights(out, reference, key)


def test_a_sharded_start_from_init_from_trains_like_a_whole_one(worker_runs, tmp_path):
    """FSDP2's lean start (init_on_meta: the big parts built without parameter memory, sharded,
    then filled from the file tensor by tensor) starts from exactly the file's weights: the
    same losses and final weights as building whole on 2 processes and on 1. The file has no
    patchify (a new part, kept as built)."""
    init = tmp_path / "init.safetensors"
    from safetensors.torch import save_file

    weights = load_file(worker_runs[1] / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("patchify.")}, init)
    runs, logs = {}, {}
    for devices, on_meta in ((2, 1), (2, 0), (1, 1)):
        out = tmp_path / f"{devices}-{on_meta}"
        result = run([sys.executable, str(WORKER), "--devices", str(devices), "--init-from", str(init),
                      "--init-on-meta", str(on_meta), "--steps", "3", "--out", str(out)], timeout=240)
        runs[devices, on_meta], logs[devices, on_meta] = out, result.stderr
    assert "into the shards of" in logs[2, 1], "the lean start ran"
    assert "into the shards of" not in logs[2, 0] + logs[1, 1]
    assert "new parts kept as built: ['patchify.conv.weight', 'patchify.conv.bias']" in logs[2, 1]
    one = json.loads((runs[1, 1] / "losses.json").read_text())
    before = json.loads((worker_runs[1] / "losses.json").read_text())
    assert one[0] < before[0] - 0.1, "the runs start from the trained weights, not from scratch"
    for key in ((2, 1), (2, 0)):
        losses = json.loads((runs[key] / "losses.json").read_text())
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(one), rtol=1e-5, atol=1e-5)
        assert_same_weights(runs[key], runs[1, 1], key)


def test_activation_checkpointing_gives_the_same_gradients():
    from conftest import collate, make_sample

    torch.manual_seed(0)
    plain = kangaroo_tiny(image_size=56).train()
    checkpointed = kangaroo_tiny(image_size=56).train()
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, {"vision_tower": True, "language_model": True})
    assert checkpointed.vision_tower.trunk.grad_checkpointing and checkpointed.language_model.is_activation_checkpointing
    batch = collate([make_sample(plain, frames=4, text_len=6, seed=1), make_sample(plain, frames=2, text_len=3, seed=2)])
    for model in (plain, checkpointed):
        model(**batch).loss.backward()
    grads = dict(plain.named_parameters())
    compared = 0
    for name, param in checkpointed.named_parameters():
        assert (param.grad is None) == (grads[name].grad is None), name  # None: unused (the ViT's pooling norm)
        if param.grad is None:
            continue
        compared += 1
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert compared > 0.9 * len(grads)


def test_a_language_model_without_known_blocks_is_refused_before_sharding():
    model = kangaroo_tiny(image_size=56)
    model.language_model._no_split_modules = []
    with pytest.raises(ValueError, match="found no decoder layers in the language model"):
        shard_model(model, mesh=None, activation_checkpointing={})


def test_sharded_checkpoints_resume_exactly_with_two_processes_and_load_into_one(image_data, tmp_path):
    from kangaroo.cli import main
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.training.weights import load_weights

    steps = (f"--trainer.max_steps={STEPS}", f"--trainer.val_check_interval={STEPS}")
    reference = tmp_path / "uninterrupted"
    run(fit_command(image_data, reference, *FSDP, *steps))
    lines = {rank: steps_of(reference, rank) for rank in (0, 1)}
    assert all([line["step"] for line in lines[rank]] == list(range(STEPS)) for rank in (0, 1))
    final = load_file(reference / "model.safetensors")

    killed = tmp_path / "killed"
    kill_after = kill_at_a_random_step(fit_command(image_data, killed, *FSDP, *steps), killed, steps=STEPS)
    checkpoint = latest_checkpoint(str(killed))
    assert os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, COMPLETE_MARKER))
    assert {p.name for p in Path(checkpoint).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}, "one shard each"
    resumed_at = torch.load(os.path.join(checkpoint, "meta.pt"), weights_only=True)["global_step"]
    assert 3 <= resumed_at <= kill_after
    result = run(fit_command(image_data, killed, *FSDP, *steps, "--ckpt_path=auto"))
    assert f"resuming from {checkpoint}" in result.stdout
    for rank in (0, 1):
        assert_same_run(killed, (lines[rank], final), resumed_at, rank=rank, epoch=15, steps=STEPS)

    # the last sharded checkpoint, consolidated offline into one file, is the final model
    last = reference / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == STEPS
    assert main(["checkpoint", "consolidate", str(last), "--output", str(tmp_path / "one.safetensors")]) == 0
    consolidated = load_file(tmp_path / "one.safetensors")
    assert set(consolidated) == set(final)
    for name, value in final.items():
        assert torch.equal(consolidated[name], value), name
    # and one process loads the sharded folder itself as init_from
    stage = load_stage_file(str(Path(__file__).resolve().parents[1] / "configs/kangaroo-tiny/1-image-pretrain.yaml"),
                            ("model",))["model"]
    stage.load_pretrained = False  # random weights, then the checkpoint's
    stage.configure_model()
    load_weights(stage.model, str(last))
    for name, value in stage.model.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_consolidating_a_folder_that_is_no_sharded_checkpoint_is_a_clear_error(tmp_path, capsys):
    from kangaroo.cli import main

    (tmp_path / "step=3.ckpt").mkdir()
    assert main(["checkpoint", "consolidate", str(tmp_path / "step=3.ckpt")]) == 2
    assert "is not a sharded checkpoint folder (no .metadata)" in capsys.readouterr().err
    assert not (tmp_path / "step=3.safetensors").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"activation_checkpointing": {"vision_towr": True}}, "unknown part(s) ['vision_towr']"),
    ({"param_dtype": "bf16"}, "param_dtype must be one of"),
    ({"reduce_dtype": "auto"}, "reduce_dtype must be one of"),
])
def test_strategy_settings_that_mean_nothing_are_refused(kwargs, message):
    from kangaroo.training.fsdp import FSDP2Strategy

    with pytest.raises(ValueError) as err:
        FSDP2Strategy(**kwargs)
    assert message in str(err.value)


@pytest.fixture
def own_environment():
    """A Trainer run inside the test process sets MASTER_PORT, LOCAL_RANK and the like in
    os.environ; a later test's subprocess inheriting LOCAL_RANK would wait for ranks nobody
    starts. The environment is put back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _tiny_stage():
    from fsdp_worker import architecture

    from kangaroo.training.stage import KangarooStage

    return KangarooStage(architecture(), trainable={"vision_tower": True, "patchify": True, "projector": True,
                                                    "language_model": True})


def test_a_plain_model_parallel_strategy_is_refused_for_leaving_the_model_unsharded(own_environment):
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    stage = _tiny_stage()
    stage.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(TypeError, match="use kangaroo.training.fsdp.FSDP2Strategy"):
        stage.configure_model()


def test_one_gathered_checkpoint_file_on_an_object_store_is_refused_before_training(own_environment):
    # sharded checkpoints go to s3:// (tests/test_cloud.py); the gathered single file has no such path
    import lightning as L

    from kangaroo.training.fsdp import FSDP2Strategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(save_distributed_checkpoint=False),
                        max_steps=1, logger=False, default_root_dir="s3://kangaroo-runs/stage", enable_progress_bar=False)
    with pytest.raises(ValueError, match="one gathered checkpoint file .* is not written to s3://kangaroo-runs/stage"):
        trainer.fit(_tiny_stage(), train_dataloaders=torch.utils.data.DataLoader([]))


# -- validation on several processes ------------------------------------------------------------

QUESTION_TOKENS = 256


@pytest.fixture(scope="module")
def held_out_questions(tmp_path_factory, tiny_tokenizer_dir):
    """15 image questions prepared with stage 1's own ``data.prepare``: one batch each, so two
    processes hold 8 and 7 validation batches."""
    from PIL import Image

    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    root = tmp_path_factory.mktemp("held-out")
    (root / "media").mkdir()
    rng = torch.Generator().manual_seed(0)
    with open(root / "questions.jsonl", "w") as manifest:
        for i in range(15):
            pixels = torch.randint(0, 255, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "media" / f"{i}.png")
            manifest.write(json.dumps({"id": f"q-{i}", "image": f"media/{i}.png", "task": "mcq",
                                       "question": "Which colour?", "options": ["red", "green", "blue", "yellow"],
                                       "answer": "ABCD"[i % 4]}) + "\n")
    sections = load_stage_file(str(Path(__file__).resolve().parents[1] / "configs/kangaroo-tiny/1-image-pretrain.yaml"))
    sections["data"].prepare.tokenizer = tiny_tokenizer_dir
    sections["data"].prepare.max_tokens = QUESTION_TOKENS  # the question's words take more than a caption's
    prepare_dataset(str(root / "questions.jsonl"), str(root / "prepared"), sections["data"].prepare,
                    visual_layout(sections["model"].architecture))
    assert (root / "prepared" / "rejects.jsonl").read_text() == "", "every question fits the budget"
    return str(root / "prepared")


def validate_command(image_data, questions: str, run: Path, *extra: str) -> list[str]:
    """Two training steps, then validation inside the fit, where a sharded model under FSDP2 meets
    its held-out set (a `kangaroo validate` alone did not hang before the fix). The learning rate
    is far below fp32's resolution of the weights, so one process and two validate the same
    weights, and their metrics must agree."""
    prepared, tokenizer = image_data
    return [sys.executable, "-m", "kangaroo.cli", "fit", "--config",
            str(Path(__file__).resolve().parents[1] / "configs/kangaroo-tiny/1-image-pretrain.yaml"),
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--model.optimizer.lr=1e-12",
            "--model.optimizer.min_lr=1e-13", "--model.optimizer.warmup_steps=0",
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
            "--trainer.enable_progress_bar=false", f"--data.train_dir={prepared}", f"--data.val_dir={questions}",
            "--data.rows_per_batch=1", f"--data.prepare.tokenizer={tokenizer}", f"--data.max_tokens={QUESTION_TOKENS}",
            f"--data.prepare.max_tokens={QUESTION_TOKENS}",
            "--model.architecture.language_model.pretrained=null", "--model.architecture.vision_tower.pretrained=null",
            *extra]


def validation_metrics(run: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader((next(run.rglob("metrics.csv"))).open()))
    return {key: float(value) for row in rows for key, value in row.items() if key.startswith("val/") and value}


# FSDP2 with its default settings, as in the run that hung before every process got as many batches
@pytest.mark.parametrize("strategy", [("--trainer.strategy=ddp",), FSDP[1:2]], ids=["ddp", "fsdp2"])
def test_validation_on_uneven_shares_finishes_with_the_one_process_metrics(image_data, held_out_questions,
                                                                         tmp_path, strategy):
    one = tmp_path / "one"
    run(validate_command(image_data, held_out_questions, one), timeout=240)
    two = tmp_path / "two"
    run(validate_command(image_data, held_out_questions, two, "--trainer.devices=2", *strategy), timeout=240)
    expected, measured = validation_metrics(one), validation_metrics(two)
    assert set(expected) >= {"val/loss", "val/accuracy"}
    assert all(math.isfinite(expected[key]) for key in ("val/loss", "val/accuracy")), expected
    assert measured.keys() == expected.keys()
    for key, value in expected.items():  # the groups hold no question here: nan in both
        assert measured[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one_with_every_record_of_its_epoch_once(image_data, tmp_path):
    """The model and optimizer reshard (torch distributed checkpoint), and the data rule holds:
    the records of the interrupted epoch that neither process trained on (those in a packer's
    buffer included) come first, each once, then the next epoch."""
    every = ("--data.rows_per_batch=1",)  # a checkpoint every 3 steps (fit_command), at the last step
    killed = tmp_path / "resharded"
    run(fit_command(image_data, killed, *FSDP, *every, "--trainer.max_steps=3", "--trainer.val_check_interval=3"))
    checkpoint = latest_checkpoint(str(killed))
    assert {p.name for p in Path(checkpoint).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    first = [i for rank in (0, 1) for line in steps_of(killed, rank) for i in line["ids"]]
    assert len(first) == len(set(first)) < 30, "both processes were inside their first epoch"

    result = run(fit_command(image_data, killed, *FSDP[1:], "--trainer.devices=1", *every, "--trainer.max_steps=40",
                             "--trainer.val_check_interval=40", "--ckpt_path=auto"))
    assert "a checkpoint of 2 processes resumes on 1" in result.stderr
    assert "random states of 2 processes in the checkpoint, 1 now: not restored" in result.stderr
    resumed = [line for line in steps_of(killed, 0) if line["step"] >= 3]
    assert resumed[0]["step"] == 3, "the run went on from the checkpoint's step"
    after = [i for line in resumed for i in line["ids"]]
    everything = {f"img-{i}" for i in range(30)}
    rest = after[: 30 - len(first)]
    assert len(rest) == len(set(rest)) and set(rest) == everything - set(first), "the interrupted epoch's rest, once"
    assert set(after[len(rest): len(rest) + 30]) == everything, "then the next epoch, whole"


def test_a_sharded_checkpoint_of_one_process_resumes_on_two_splitting_the_rest_of_its_epoch(image_data, tmp_path):
    every = ("--data.rows_per_batch=1",)
    grown = tmp_path / "grown"
    one = (*FSDP[1:], "--trainer.devices=1")
    run(fit_command(image_data, grown, *one, *every, "--trainer.max_steps=3", "--trainer.val_check_interval=3"))
    first = [i for line in steps_of(grown, 0) for i in line["ids"]]
    assert len(first) == len(set(first)) < 30
    result = run(fit_command(image_data, grown, *FSDP, *every, "--trainer.max_steps=12",
                             "--trainer.val_check_interval=12", "--ckpt_path=auto"))
    assert "a checkpoint of 1 processes resumes on 2" in result.stderr
    left = 30 - len(first)
    shares = {0: (left + 1) // 2, 1: left // 2}  # contiguous blocks of the sorted rest, the first one larger
    rest = []
    for rank in (0, 1):
        lines = [line for line in steps_of(grown, rank) if line["step"] >= 3]
        assert lines[0]["step"] == 3
        rest += [i for line in lines for i in line["ids"]][: shares[rank]]
    assert len(rest) == len(set(rest)) and set(rest) == {f"img-{i}" for i in range(30)} - set(first)
