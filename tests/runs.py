"""Helpers for the tests that run `kangaroo fit` and tests/fsdp_worker.py as processes: the
command of a short stage-1 fit, its per-step sample log, killing it at a random step, and
comparing the weights two runs wrote. (Shared fixtures live in conftest.py; test modules import
helpers from here, never from each other.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "configs" / "kangaroo-tiny" / "1-image-pretrain.yaml"
STEPS, EVERY = 14, 3


def prepare_images(root: Path, tokenizer: str, count: int, words_of, frame_format: str = "raw") -> str:
    """``count`` random 32-px images captioned with ``words_of(i)`` words, prepared with stage 1's
    own ``data.prepare`` into ``root/prepared``."""
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    (root / "media").mkdir()
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "ring", "square", "bar"]
    with open(root / "images.jsonl", "w") as manifest:
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "media" / f"{i}.png")
            manifest.write(json.dumps({"id": f"img-{i}", "image": f"media/{i}.png", "task": "caption",
                                       "caption": " ".join(rng.choice(words, words_of(i)))}) + "\n")
    sections = load_stage_file(str(STAGE))
    sections["data"].prepare.tokenizer = tokenizer
    sections["data"].prepare.frame_format = frame_format
    prepare_dataset(str(root / "images.jsonl"), str(root / "prepared"), sections["data"].prepare,
                    visual_layout(sections["model"].architecture))
    return str(root / "prepared")


def fit_command(data: tuple[str, str], run: Path, *extra: str) -> list[str]:
    prepared, tokenizer = data
    return [sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(STAGE),
            f"--trainer.max_steps={STEPS}", f"--trainer.val_check_interval={STEPS}", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
            "--trainer.enable_progress_bar=false",  # the config's ModelCheckpoint, then one more callback:
            f"--trainer.callbacks.every_n_train_steps={EVERY}",
            "--trainer.callbacks+=kangaroo.training.callbacks.SampleLog",
            f"--data.train_dir={prepared}", "--data.val_dir=null", "--data.packing=true", "--data.max_tokens=128",
            "--data.rows_per_batch=2", "--data.buffer_size=4", f"--data.prepare.tokenizer={tokenizer}",
            "--model.architecture.language_model.pretrained=null", "--model.architecture.vision_tower.pretrained=null",
            "--model.architecture.vision_tower.drop_path=0.1", *extra]


def steps_of(run: Path, rank: int = 0) -> list[dict]:
    path = run / f"samples.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


def assert_same_run(run: Path, reference: tuple[list[dict], dict], resumed_at: int, rank: int = 0,
                    epoch: int = 30, steps: int = STEPS) -> None:
    lines, final = reference
    seen = steps_of(run, rank)
    after = [line for line in seen if line["step"] >= resumed_at][-(steps - resumed_at):]
    assert after == lines[resumed_at:], f"rank {rank}: after the resume point, the same samples in the same order"
    trained = {line["step"]: line["ids"] for line in seen}  # a step cut off by the kill is redone
    assert [trained[s] for s in range(steps)] == [line["ids"] for line in lines]
    ids = [i for s in range(steps) for i in trained[s]]
    assert len(set(ids[:epoch])) == epoch, f"rank {rank}: no sample twice in an epoch"
    if epoch == 30:
        assert sorted(ids[:epoch]) == sorted(f"img-{i}" for i in range(30)), "none skipped in an epoch"
    mine = weights(run)
    assert set(mine) == set(final)
    for name in final:
        torch.testing.assert_close(mine[name], final[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def run_fit(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_at_a_random_step(command: list[str], run: Path, steps: int = STEPS) -> int:
    """Starts ``command`` and SIGKILLs it (every process of it) once a random step after the
    first checkpoint has started; returns that step."""
    kill_after = random.Random().randint(EVERY + 1, steps - 2)
    print(f"killing once step {kill_after} has started")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while len(steps_of(run)) <= kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before the kill: " + process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)  # with 2 processes, the launcher and the rank it started
    process.wait()
    assert not (run / "model.safetensors").exists()
    return kill_after


WORKER = Path(__file__).with_name("fsdp_worker.py")
FSDP = ("--trainer.devices=2", "--trainer.strategy.class_path=kangaroo.training.fsdp.FSDP2Strategy",
        "--trainer.strategy.init_args.activation_checkpointing=true")


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``command``; a hung collective fails the test at ``timeout`` instead of hanging it,
    and every process the command started (the other ranks) is killed with it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... did not finish within {timeout} s:\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_weights(out: Path, reference: Path, what: object = "", steps: int = 6, lr: float = 1e-2) -> None:
    """The stage weights two runs wrote agree: the same keys, and values within float32 drift
    over a few optimizer steps. AdamW divides each gradient element by the root of its running
    square: an element whose gradient is near zero (an embedding row barely used) turns a
    last-bit difference of its gradient into an update that may differ by up to ``lr`` per step,
    while every other element stays within rounding. So: all but 0.1% of each tensor's elements
    within float32 rounding (rtol 1e-3, atol 1e-4), and none further than ``steps x lr``."""
    mine, final = (load_file(Path(run) / "model.safetensors") for run in (out, reference))
    assert set(mine) == set(final)
    for name, value in final.items():
        diff = (mine[name].float() - value.float()).abs()
        close = diff <= 1e-4 + 1e-3 * value.float().abs()
        assert close.float().mean() >= 0.999, f"{what} {name}: {int((~close).sum())} of {close.numel()} elements apart"
        assert float(diff.max()) <= steps * lr, f"{what} {name}: an element {float(diff.max()):.3g} apart"
