"""The 8B recipe rehearsed: its own five stage files, derived by code into tiny models on a small
synthetic world, run on 2 gloo processes (kangaroo.recipe.rehearsal). Stage 4 crosses an epoch end
on uneven shares and is stopped by SIGTERM, then resumed on 1 process; stage 5 finishes and its
model folder answers through `kangaroo chat`. A change to an 8B stage file that breaks a real
run breaks this test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE
from runs import run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "kangaroo-8b.yaml"


def rehearse(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kangaroo.cli", "recipe", "run", str(RECIPE), "--rehearse",
            "--workdir", str(workdir), *extra]


def stop_stage_4_once_it_saved(command: list[str], workdir: Path) -> tuple[int, str]:
    """Runs ``command`` and sends SIGTERM to all its processes once stage 4 wrote its checkpoint
    of step 4, the end of its first epoch (a window of step 5 is then running, or about to)."""
    log = workdir.parent / "first-run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        checkpoints = workdir / "4-instruction-tuning" / "checkpoints"
        deadline = time.time() + 360
        try:
            while not (checkpoints.exists() and any(checkpoints.glob("*step=4*"))):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "stage 4 saved no checkpoint in time"
                time.sleep(0.1)
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, log.read_text()


def test_the_8b_stage_files_run_at_tiny_scale_on_two_processes(tmp_path):
    workdir = tmp_path / "rehearsal"
    code, output = stop_stage_4_once_it_saved(rehearse(workdir, "--devices", "2", "--until", "4-instruction-tuning"),
                                              workdir)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    ends = re.findall(r"the epoch ended after (\d+) micro-batches on each of 2 processes \((\d+) optimizer steps "
                      r"of 4\); shares of (\d+)/(\d+) real", output)
    assert ends, "stage 4 reached its first epoch's end"
    batches, steps, first, second = map(int, ends[-1])
    assert first != second and batches == 4 * steps == 16, f"uneven shares, evened to whole windows: {ends[-1]}"
    # every override is printed; what the 8B files say is kept
    assert "[4-instruction-tuning] data.global_batch: 128 -> 8" in output
    assert "[1-image-pretrain] trainer.max_steps: 73243 -> 3" in output
    assert not re.search(r"\] trainer\.strategy|language_model_overrides|param_dtype", output), \
        "the strategy and the RoPE choice are the 8B files' own"
    import yaml

    stage4 = yaml.safe_load((workdir / "4-instruction-tuning" / "stage.yaml").read_text())
    assert stage4["trainer"]["strategy"]["class_path"] == "kangaroo.training.fsdp.FSDP2Strategy"
    assert stage4["trainer"]["strategy"]["init_args"]["param_dtype"] == "bfloat16"
    architecture = stage4["model"]["architecture"]
    assert architecture["language_model"]["attn_implementation"] == "auto"
    assert architecture["language_model_overrides"]["rope_parameters"]["rope_type"] == "llama3"
    assert architecture["language_model"]["transformers_config"]["hidden_size"] < 4096, "the tiny LLM"
    state = json.loads((workdir / "recipe-state.json").read_text())["stages"]
    assert [state[s]["status"] for s in sorted(state)][:3] == ["done"] * 3
    assert state["4-instruction-tuning"]["status"] == "preempted"
    preempted = next((workdir / "4-instruction-tuning").rglob("preempted.ckpt"))
    saved = torch.load(preempted / "meta.pt", weights_only=False)  # FSDP2: a sharded checkpoint folder
    # the window running at the signal (step 5), or the validation after step 4, finished first
    assert saved["global_step"] in (4, 5) and len(saved["KangarooDataModule"]["train_by_rank"]) == 2

    # stage 4 goes on with 1 process (accumulation 8: the same global batch)
    result = run(rehearse(workdir, "--devices", "1", "--only", "4-instruction-tuning"), timeout=300)
    assert "resumes on 1" in result.stderr
    assert "global batch 8 rows = 1 processes x 1 rows x 8 micro-batches" in result.stdout + result.stderr
    metrics = json.loads((workdir / "4-instruction-tuning" / "stage-metrics.json").read_text())
    planned = re.search(r"-> max_steps (\d+)", result.stdout + result.stderr)
    assert planned and metrics["steps"] == int(planned.group(1))

    result = run(rehearse(workdir, "--devices", "2", "--only", "5-long-video-tuning"), timeout=300)
    folder = workdir / "5-long-video-tuning" / "model"
    assert (folder / "model.safetensors").exists()
    video = next((workdir / "world").rglob("*.mp4"))
    history = tmp_path / "history.json"
    chat = subprocess.run([sys.executable, "-m", "kangaroo.cli", "chat", "--model", str(folder), "--video", str(video),
                           "--query", "What happens in the video?", "--max-new-tokens", "8", "--history", str(history)],
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr[-2000:]
    # a few steps of a tiny model may answer with end-of-turn at once: the reply may be empty, the turn is kept
    turns = json.loads(history.read_text())["messages"]
    assert [turn["role"] for turn in turns] == ["user", "assistant"] and video.name in history.read_text()
