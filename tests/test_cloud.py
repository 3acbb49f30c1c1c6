"""Object storage everywhere a path goes, against a real S3-compatible server on 127.0.0.1
(``moto_server``): media and prepared data, stage checkpoints through an outage of the server,
and the tiny recipe end to end with its data and workdir on the server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_video
from s3server import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "configs" / "kangaroo-tiny" / "1-image-pretrain.yaml"
BUCKET = "kangaroo-test"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    import s3fs

    endpoint = S3Endpoint(BUCKET)
    for key, value in endpoint.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "litdata-cache"))
    monkeypatch.setenv("KANGAROO_SCRATCH", str(tmp_path / "scratch"))
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made for an earlier endpoint
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint.close()


def test_prepare_reads_media_from_s3_and_writes_chunks_there(s3, tmp_path, stage_yaml):
    from litdata import StreamingDataset

    media = tmp_path / "media"
    media.mkdir()
    for i in range(3):
        random_video(media / f"clip{i}.mp4", frames=20, fps=10, seed=i)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(media / "still.png")
    client = s3.client()
    for path in media.iterdir():
        client.upload_file(str(path), BUCKET, f"media/{path.name}")
    rows = [(f"clip{i}", "video", f"clip{i}.mp4") for i in range(3)] + [("still", "image", "still.png")]
    for name, base in (("local.jsonl", str(media)), ("remote.jsonl", f"s3://{BUCKET}/media")):
        lines = [json.dumps({"id": i, kind: f"{base}/{file}", "task": "caption", "caption": f"Sample {i}."})
                 for i, kind, file in rows]
        if name == "remote.jsonl":
            lines.append(json.dumps({"id": "gone", "video": f"{base}/gone.mp4", "task": "caption", "caption": "x"}))
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    def prepare(manifest: str, output: str, root: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kangaroo.cli", "data", "prepare", "--manifest", manifest,
                               "--output", output, "--stage", stage_yaml(), "--allowed-root", root, *extra],
                              capture_output=True, text=True)

    local = prepare(str(tmp_path / "local.jsonl"), str(tmp_path / "prepared"), str(media))
    assert local.returncode == 0, local.stderr[-3000:]
    remote = prepare(str(tmp_path / "remote.jsonl"), f"s3://{BUCKET}/prepared", f"s3://{BUCKET}/media")
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "prepared 4 samples" in remote.stdout and "skipped 1" in remote.stdout

    keys = s3.keys("prepared/")
    assert "prepared/index.json" in keys and any(k.endswith(".bin") for k in keys)
    rejects = client.get_object(Bucket=BUCKET, Key="prepared/rejects.jsonl")["Body"].read().decode()
    assert [json.loads(line)["id"] for line in rejects.splitlines()] == ["gone"]
    assert json.loads(rejects)["reason"].startswith("missing file")

    # The stream from the server holds exactly what preparing the same media locally gives.
    streamed = {r["id"]: r for r in StreamingDataset(f"s3://{BUCKET}/prepared", cache_dir=str(tmp_path / "cache"))}
    expected = {r["id"]: r for r in StreamingDataset(str(tmp_path / "prepared"))}
    assert streamed.keys() == expected.keys() == {r[0] for r in rows}
    for sample_id, record in expected.items():
        for field in ("pixels", "timestamps", "input_ids", "labels"):
            assert np.array_equal(np.asarray(streamed[sample_id][field]), np.asarray(record[field])), (sample_id, field)

    # Two shards written to the server and merged there read back as the one-pass dataset, in order.
    for shard in ("0/2", "1/2"):
        part = prepare(str(tmp_path / "remote.jsonl"), f"s3://{BUCKET}/sharded", f"s3://{BUCKET}/media", "--shard", shard)
        assert part.returncode == 0, part.stderr[-3000:]
    merged = subprocess.run([sys.executable, "-m", "kangaroo.cli", "data", "merge", f"s3://{BUCKET}/sharded"],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "prepared 4 samples" in merged.stdout and "skipped 1" in merged.stdout
    assert not any(k.startswith("sharded/parts/") for k in s3.keys("sharded/"))
    one_pass = list(StreamingDataset(f"s3://{BUCKET}/prepared", cache_dir=str(tmp_path / "cache-one")))
    joined = list(StreamingDataset(f"s3://{BUCKET}/sharded", cache_dir=str(tmp_path / "cache-joined")))
    assert [r["id"] for r in joined] == [r["id"] for r in one_pass]
    for a, b in zip(one_pass, joined):
        assert np.array_equal(np.asarray(a["pixels"]), np.asarray(b["pixels"])), a["id"]
    rejects = client.get_object(Bucket=BUCKET, Key="sharded/rejects.jsonl")["Body"].read().decode()
    assert [json.loads(line)["id"] for line in rejects.splitlines()] == ["gone"]


# -- checkpoints through an outage ---------------------------------------------------------------

def image_manifest(root: Path, count: int = 24) -> Path:
    (root / "media").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "images.jsonl", "w") as manifest:
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "media" / f"{i}.png")
            manifest.write(json.dumps({"id": f"img-{i}", "image": f"media/{i}.png", "task": "caption",
                                       "caption": "red ring" if i % 2 else "blue bar"}) + "\n")
    return root / "images.jsonl"


@pytest.fixture
def prepared_images(tmp_path, tiny_tokenizer_dir):
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout

    sections = load_stage_file(str(STAGE))
    sections["data"].prepare.tokenizer = tiny_tokenizer_dir
    prepare_dataset(str(image_manifest(tmp_path / "images")), str(tmp_path / "prepared"), sections["data"].prepare,
                    visual_layout(sections["model"].architecture))
    return str(tmp_path / "prepared"), tiny_tokenizer_dir


def stage_on_s3(data: tuple[str, str], run: str, logs: Path, steps: int) -> list[str]:
    prepared, tokenizer = data
    return [sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(STAGE),
            f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={logs}",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks.every_n_train_steps=1",
            f"--data.train_dir={prepared}", "--data.val_dir=null", "--data.rows_per_batch=2",
            f"--data.prepare.tokenizer={tokenizer}", "--model.architecture.language_model.pretrained=null",
            "--model.architecture.vision_tower.pretrained=null"]


def wait_for_key(s3: S3Endpoint, prefix: str, suffix: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(k.endswith(suffix) for k in s3.keys(prefix)):
        assert process.poll() is None, f"the run ended before writing {prefix}*{suffix}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {prefix}*{suffix} after {timeout} s"
        time.sleep(0.1)


def test_checkpoint_uploads_ride_out_an_outage_and_fail_clearly_past_the_retry_budget(s3, tmp_path, prepared_images,
                                                                                       monkeypatch):
    from kangaroo.training.checkpoints import latest_checkpoint

    # Down for 10 s just after the step-2 checkpoint, longer than the S3 client's own retries:
    # the next upload is retried with backoff and the run goes on.
    monkeypatch.setenv("KANGAROO_UPLOAD_ATTEMPTS", "6")
    monkeypatch.setenv("KANGAROO_UPLOAD_BACKOFF", "1")  # 1 + 2 + 4 + 8 + 16 s of waiting at most
    run = f"s3://{BUCKET}/outage"
    process = subprocess.Popen(stage_on_s3(prepared_images, run, tmp_path / "logs", steps=8),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_key(s3, "outage/", "step=2.ckpt", process)
    s3.down()
    time.sleep(10)
    s3.up()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    retried = [line for line in stderr.splitlines() if "retrying in" in line]
    assert retried and all(f" {run}/" in line for line in retried), stderr[-3000:]  # an upload or a lookup
    keys = s3.keys("outage/")
    assert "outage/model.safetensors" in keys and "outage/stage-metrics.json" in keys
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if k.endswith(".ckpt")) == [
        "epoch=0-step=6.ckpt", "epoch=0-step=7.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    assert json.loads(s3.client().get_object(Bucket=BUCKET, Key="outage/stage-metrics.json")["Body"].read())["steps"] == 8

    # Down for good after the step-2 checkpoint: the run stops with a clear error once the budget
    # is spent, and the newest checkpoint on the server is a whole one.
    monkeypatch.setenv("KANGAROO_UPLOAD_ATTEMPTS", "3")
    monkeypatch.setenv("KANGAROO_UPLOAD_BACKOFF", "0.5")
    run = f"s3://{BUCKET}/down"
    process = subprocess.Popen(stage_on_s3(prepared_images, run, tmp_path / "logs2", steps=30),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_key(s3, "down/", "step=2.ckpt", process)
    s3.down()
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        s3.up()
    assert process.returncode == 1, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.startswith("kangaroo: error:")]
    assert len(error) == 1 and f"{s3.url} could not be reached" in error[0], stderr[-3000:]
    assert "Checkpoints written before are intact" in error[0]
    newest = latest_checkpoint(run)
    assert newest is not None and newest.startswith(f"{run}/")
    from kangaroo import storage

    with storage.open_file(newest) as handle:
        checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] >= 2 and "state_dict" in checkpoint


def test_sharded_checkpoints_on_s3_resume_after_sigkill_and_ride_out_an_outage(s3, tmp_path, prepared_images,
                                                                               monkeypatch):
    # two FSDP2 processes, their default_root_dir on the server: each uploads its own shard,
    # rank 0 the metadata and then COMPLETE
    import os

    from safetensors.torch import load_file

    from kangaroo import storage
    from kangaroo.training.checkpoints import latest_checkpoint

    monkeypatch.setenv("KANGAROO_UPLOAD_ATTEMPTS", "6")
    monkeypatch.setenv("KANGAROO_UPLOAD_BACKOFF", "1")
    sharded = ["--trainer.devices=2", "--trainer.strategy.class_path=kangaroo.training.fsdp.FSDP2Strategy",
               "--trainer.strategy.init_args.timeout=0:02:00"]
    steps = 6

    # the reference run, with the server down for 8 s just after its step-2 checkpoint is whole
    reference = f"s3://{BUCKET}/sharded-reference"
    process = subprocess.Popen([*stage_on_s3(prepared_images, reference, tmp_path / "logs-a", steps), *sharded],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_key(s3, "sharded-reference/", "step=2.ckpt/COMPLETE", process, timeout=240)
    s3.down()
    time.sleep(8)
    s3.up()
    _, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]
    assert any("retrying in" in line for line in stderr.splitlines()), "the outage was met and ridden out"
    keys = s3.keys("sharded-reference/")
    step = [k for k in keys if "step=6.ckpt/" in k]
    names = sorted(k.rsplit("/", 1)[-1] for k in step)
    assert names == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "meta.pt"], names
    with storage.open_file(f"{reference}/model.safetensors") as handle:
        (tmp_path / "final.safetensors").write_bytes(handle.read())
    final = load_file(tmp_path / "final.safetensors")

    # killed after its step-3 checkpoint, then resumed from the server with --ckpt_path=auto
    run = f"s3://{BUCKET}/sharded-killed"
    command = [*stage_on_s3(prepared_images, run, tmp_path / "logs-b", steps), *sharded]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for_key(s3, "sharded-killed/", "step=3.ckpt/COMPLETE", process, timeout=240)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    newest = latest_checkpoint(run)
    assert newest is not None and "step=" in newest
    result = subprocess.run([*command, "--ckpt_path=auto"], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {newest}" in result.stdout
    with storage.open_file(f"{run}/model.safetensors") as handle:
        (tmp_path / "resumed.safetensors").write_bytes(handle.read())
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert set(resumed) == set(final)
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")

    # the sharded folder on the server reads back whole: consolidated into one file
    from kangaroo.cli import main

    folder = step[0].rsplit("/", 1)[0]  # epoch=E-step=6.ckpt
    assert main(["checkpoint", "consolidate", f"s3://{BUCKET}/{folder}",
                 "--output", str(tmp_path / "one.safetensors")]) == 0
    consolidated = load_file(tmp_path / "one.safetensors")
    for name, value in final.items():
        assert torch.equal(consolidated[name], value), name


def test_the_8b_recipe_with_an_s3_workdir_passes_its_set_up_checks(s3, tmp_path):
    # the documented `kangaroo recipe run recipes/kangaroo-8b.yaml --workdir s3://...`, up to the
    # start of training: every stage resolves, stage 1 (FSDP2, sharded checkpoints) instantiates
    # with its root on the server, and its checkpoint callback accepts that root
    import yaml

    from kangaroo.recipe import load_recipe
    from kangaroo.recipe.spec import merged_config
    from kangaroo.training.checkpoints import StageCheckpoint
    from kangaroo.training.fit import KangarooCLI
    from kangaroo.training.fsdp import FSDP2Strategy

    workdir = f"s3://{BUCKET}/kangaroo-8b"
    shown = subprocess.run([sys.executable, "-m", "kangaroo.cli", "recipe", "show", str(ROOT / "recipes" / "kangaroo-8b.yaml"),
                            "--workdir", workdir], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"default_root_dir: {workdir}/1-image-pretrain" in shown.stdout
    assert f"init_from: {workdir}/4-instruction-tuning/model.safetensors" in shown.stdout

    recipe = load_recipe(str(ROOT / "recipes" / "kangaroo-8b.yaml"))
    config = merged_config(recipe, recipe.stages[0], workdir)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = KangarooCLI(args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
                            "--trainer.precision=32-true"], run=False)
    assert isinstance(cli.trainer.strategy, FSDP2Strategy) and cli.trainer.strategy._save_distributed_checkpoint
    assert cli.trainer.default_root_dir == f"{workdir}/1-image-pretrain"
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, StageCheckpoint))
    callback.setup(cli.trainer, cli.model, "fit")
    assert callback.save_last is True, "an object store has no links: last.ckpt is a full copy"
    cli.model.load_pretrained, cli.model.init_from = False, None
    with torch.device("meta"):
        cli.model.configure_model()
    assert cli.model.model.language_model.config.num_hidden_layers == 32


# -- the tiny recipe on the server ----------------------------------------------------------------

def test_tiny_recipe_runs_end_to_end_on_s3_and_continues_after_a_sigterm(s3, small_world, tmp_path):
    """Data and workdir on the server; the runner gets SIGTERM (a preemption notice) during
    stage 3, exits 75, and the next run continues stage 3 from its checkpoint on the server.
    Three stages: the chain of all five with a kill in stage 3 runs locally in test_recipe."""
    from recipes import chain_recipe

    from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE

    recipe = chain_recipe(tmp_path, small_world, stage3_steps=12, count=3)
    work = f"s3://{BUCKET}/runs/chain"
    command = [sys.executable, "-m", "kangaroo.cli", "recipe", "run", recipe, "--workdir", work]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_key(s3, "runs/chain/3-pretrain-refinement/checkpoints/", "step=2.ckpt", runner, timeout=400)
    runner.send_signal(signal.SIGTERM)  # the runner passes it on to the stage
    _, stderr = runner.communicate(timeout=120)
    assert runner.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "stopped for SIGTERM after saving a checkpoint" in stderr
    state = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/chain/recipe-state.json")["Body"].read())
    stages = sorted(state["stages"])
    assert [state["stages"][n]["status"] for n in stages] == ["done", "done", "preempted"]
    assert "runs/chain/3-pretrain-refinement/checkpoints/preempted.ckpt" in s3.keys("runs/chain/")

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[3-pretrain-refinement] resuming from {work}/3-pretrain-refinement/checkpoints/" in result.stdout
    assert "[1-image-pretrain]" not in result.stdout and "[2-video-pretrain]" not in result.stdout
    keys = set(s3.keys("runs/chain/"))
    for name in stages:
        for file in ("model.safetensors", "stage-metrics.json", "stage.yaml", "checkpoints/last.ckpt",
                     "data/{}/train/index.json", "data/{}/val/index.json"):
            key = f"runs/chain/{file.format(name)}" if file.startswith("data/") else f"runs/chain/{name}/{file}"
            assert key in keys, key
        assert any(k.startswith(f"runs/chain/{name}/logs/") and k.endswith("metrics.csv") for k in keys), name
    state = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/chain/recipe-state.json")["Body"].read())
    assert [state["stages"][n]["status"] for n in stages] == ["done"] * 3
    assert state["stages"]["3-pretrain-refinement"]["metrics"]["steps"] == 12
    assert state["stages"]["3-pretrain-refinement"]["checkpoint"] == f"{work}/3-pretrain-refinement/model.safetensors"
    summary = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/chain/summary.json")["Body"].read())
    assert [s["name"] for s in summary["stages"]] == stages and summary["final_eval_accuracy"] is not None
    assert "runs/chain/summary.png" in keys
    for file in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):  # the last stage's
        assert f"runs/chain/3-pretrain-refinement/model/{file}" in keys, file
    assert state["stages"]["3-pretrain-refinement"]["model_folder"] == f"{work}/3-pretrain-refinement/model"
    stage2 = s3.client().get_object(Bucket=BUCKET, Key="runs/chain/2-video-pretrain/stage.yaml")["Body"].read().decode()
    assert f"init_from: {work}/1-image-pretrain/model.safetensors" in stage2
    assert not list(Path(tmp_path).glob("s3:*")) and not list(ROOT.glob("s3:*")), "no local folder named after a URL"

    # A further run finds every stage done on the server and trains nothing.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "kangaroo.cli fit" not in again.stdout and "final held-out accuracy" in again.stdout
