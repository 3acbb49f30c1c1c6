"""Preemption-safe stages: a run killed with SIGKILL (or stopped by SIGTERM) and resumed trains on
exactly the samples, in exactly the order, of an uninterrupted run and ends with the same
weights; incomplete checkpoints are never resumed from."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kangaroo.training.checkpoints import COMPLETE_MARKER, PREEMPTED_EXIT_CODE, AtomicCheckpointIO, latest_checkpoint
from runs import (EVERY, STAGE, STEPS, assert_same_run, fit_command, kill_at_a_random_step, run_fit, steps_of,
                  weights)

@pytest.fixture(scope="module")
def uninterrupted(image_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(fit_command(image_data, run), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = steps_of(run)
    assert [line["step"] for line in lines] == list(range(STEPS))
    kept = sorted(p.name.split("step=")[-1] for p in run.rglob("*.ckpt"))  # the config keeps the last 3
    assert kept == ["12.ckpt", "6.ckpt", "9.ckpt", "last.ckpt"], kept
    return lines, weights(run)


def test_sigkill_at_a_random_step_then_resume_trains_as_if_uninterrupted(image_data, uninterrupted, tmp_path):
    kill_after = kill_at_a_random_step(fit_command(image_data, tmp_path), tmp_path)
    checkpoint = latest_checkpoint(str(tmp_path))
    resumed_at = torch.load(checkpoint, weights_only=False)["global_step"]
    assert EVERY <= resumed_at <= kill_after
    result = subprocess.run(fit_command(image_data, tmp_path, "--ckpt_path=auto"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoint}" in result.stdout
    assert_same_run(tmp_path, uninterrupted, resumed_at)


def test_two_processes_killed_at_a_random_step_resume_as_if_uninterrupted(image_data, tmp_path):
    two = ("--trainer.devices=2", "--trainer.strategy=ddp")  # CPU processes on gloo
    reference = tmp_path / "uninterrupted"
    result = subprocess.run(fit_command(image_data, reference, *two), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {rank: steps_of(reference, rank) for rank in (0, 1)}
    assert all([line["step"] for line in lines[rank]] == list(range(STEPS)) for rank in (0, 1))
    assert set(lines[0][0]["ids"]).isdisjoint(lines[1][0]["ids"]), "each process streams its own share"
    final = weights(reference)

    run = tmp_path / "killed"
    kill_after = kill_at_a_random_step(fit_command(image_data, run, *two), run)
    checkpoint = latest_checkpoint(str(run))
    saved = torch.load(checkpoint, weights_only=False)
    resumed_at = saved["global_step"]
    assert EVERY <= resumed_at <= kill_after
    assert len(saved["KangarooDataModule"]["train_by_rank"]) == 2, "one data position per process"
    assert len(saved["rng_states"]) == 2, "random states per process"
    result = subprocess.run(fit_command(image_data, run, *two, "--ckpt_path=auto"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert_same_run(run, (lines[rank], final), resumed_at, rank=rank, epoch=15)


def test_sigterm_saves_a_checkpoint_exits_75_and_the_run_continues_from_it(image_data, uninterrupted, tmp_path):
    process = subprocess.Popen(fit_command(image_data, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while len(steps_of(tmp_path)) < 5 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE == 75, stderr.decode()[-3000:]
    preempted = next(tmp_path.rglob("preempted.ckpt"))
    assert latest_checkpoint(str(tmp_path)) == str(preempted)
    stopped_at = torch.load(preempted, weights_only=False)["global_step"]
    assert stopped_at == steps_of(tmp_path)[-1]["step"] + 1, "the running step finished before the save"
    result = subprocess.run(fit_command(image_data, tmp_path, "--ckpt_path=auto"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted, stopped_at)


def test_incomplete_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "step=3.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(64, 64)}}, str(good))
    assert not list(tmp_path.glob("*.partial"))
    truncated = tmp_path / "step=6.ckpt"
    io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.ones(64, 64)}}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    unfinished = tmp_path / "step=9.ckpt"  # a directory checkpoint without its marker
    unfinished.mkdir()
    (unfinished / "shard-0.distcp").write_bytes(b"x" * 10)
    now = time.time()
    for age, path in enumerate((unfinished, truncated, good)):
        os.utime(path, (now - age, now - age))
    with pytest.warns(UserWarning) as caught:
        assert latest_checkpoint(str(tmp_path)) == str(good)
    named = " ".join(str(w.message) for w in caught)
    assert str(truncated) in named and str(unfinished) in named
    (unfinished / COMPLETE_MARKER).write_text("")
    assert latest_checkpoint(str(tmp_path)) == str(unfinished)
    assert torch.load(good)["global_step"] == 3


def test_a_write_cut_off_never_takes_the_checkpoint_name(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, str(path))

    def cut_off(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", cut_off)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path)["global_step"] == 1, "the previous checkpoint is intact"
    assert not list(tmp_path.glob("*.partial"))


ACCUMULATE = ("--trainer.accumulate_grad_batches=2", "--data.num_workers=2")
"""Two micro-batches per optimizer step, read by two loader workers: SampleLog writes a line per
micro-batch, both lines of a window carrying the window's step."""


def windows_of(run: Path) -> dict[int, list[list[str]]]:
    """Each optimizer step's micro-batches (sample ids), as the run (and its resume) trained them:
    a window cut off by a kill is logged in part and then again whole, so its last two count."""
    by_step: dict[int, list[list[str]]] = {}
    for line in steps_of(run):
        by_step.setdefault(line["step"], []).append(line["ids"])
    return {step: ids[-2:] for step, ids in by_step.items()}


@pytest.fixture(scope="module")
def uninterrupted_accumulating(image_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted-accumulating")
    result = subprocess.run(fit_command(image_data, run, *ACCUMULATE), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    windows = windows_of(run)
    assert sorted(windows) == list(range(STEPS)) and all(len(w) == 2 for w in windows.values())
    assert len(steps_of(run)) == 2 * STEPS, "two micro-batches per step"
    return windows, weights(run)


def start_and_signal_inside_a_window(command: list[str], run: Path, sig: int) -> subprocess.Popen:
    """Starts ``command`` and sends ``sig`` to its processes while an accumulation window past the
    first checkpoint is half done (an odd number of micro-batches started). Tries again (a new
    run) when the signal landed between windows; returns the signalled process."""
    for _ in range(3):
        micro = 2 * random.Random().randint(EVERY + 1, STEPS - 2) + 1
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 300
        while len(steps_of(run)) < micro and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before the signal: " + process.stderr.read().decode()[-2000:]
        os.killpg(process.pid, sig)
        started = len(steps_of(run))
        if sig == signal.SIGKILL:
            process.wait()
        if started % 2 == 1:
            print(f"signalled inside window {started // 2} (micro-batch {started} started)")
            return process
        process.wait()
        for path in run.iterdir():  # landed between windows: start over
            subprocess.run(["rm", "-rf", str(path)], check=True)
    pytest.fail("no signal landed inside an accumulation window in three tries")


def assert_same_windows(run: Path, reference) -> None:
    windows, final = reference
    mine = windows_of(run)
    assert sorted(mine) == list(range(STEPS))
    assert [mine[s] for s in range(STEPS)] == [windows[s] for s in range(STEPS)], \
        "every step trained on the same two micro-batches as the uninterrupted run"
    ids = [i for s in range(STEPS) for batch in mine[s] for i in batch]
    assert len(set(ids[:30])) == 30, "no sample twice in an epoch"
    current = weights(run)
    for name in final:
        torch.testing.assert_close(current[name], final[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sigkill_inside_an_accumulation_window_resumes_as_if_uninterrupted(image_data, uninterrupted_accumulating,
                                                                           tmp_path):
    command = fit_command(image_data, tmp_path, *ACCUMULATE)
    start_and_signal_inside_a_window(command, tmp_path, signal.SIGKILL)
    checkpoint = latest_checkpoint(str(tmp_path))
    resumed_at = torch.load(checkpoint, weights_only=False)["global_step"]
    assert resumed_at >= EVERY
    result = subprocess.run([*command, "--ckpt_path=auto"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_windows(tmp_path, uninterrupted_accumulating)


def test_sigterm_inside_an_accumulation_window_finishes_the_window_then_saves(image_data, uninterrupted_accumulating,
                                                                              tmp_path):
    command = fit_command(image_data, tmp_path, *ACCUMULATE)
    process = start_and_signal_inside_a_window(command, tmp_path, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr.decode()[-3000:]
    preempted = next(tmp_path.rglob("preempted.ckpt"))
    stopped_at = torch.load(preempted, weights_only=False)["global_step"]
    assert len(steps_of(tmp_path)) == 2 * stopped_at, "the window finished, and no micro-batch of the next began"
    result = subprocess.run([*command, "--ckpt_path=auto"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_windows(tmp_path, uninterrupted_accumulating)


GRACE_S = 15


def test_sigterm_ends_a_run_stuck_in_a_collective_within_its_grace(image_data, tmp_path):
    """Process 1 hangs at step 7; process 0 waits for it inside the gradient all-reduce, where the
    stage never gets to act on SIGTERM. The watchdog ends both GRACE_S after the signal with the
    preemption exit code, and the newest checkpoint (step 6) is whole and loads."""
    command = fit_command(image_data, tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp",
                          "--trainer.callbacks+=stuck_rank.StuckRank", "--trainer.callbacks.at_step=7",
                          "--trainer.callbacks+=kangaroo.training.checkpoints.PreemptionCheckpoint",
                          f"--trainer.callbacks.grace_s={GRACE_S}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env=env)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "stuck").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it hung: " + process.stderr.read().decode()[-2000:]
        time.sleep(2)  # process 0 is inside the all-reduce of step 7 by now
        assert process.poll() is None
        os.killpg(process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=GRACE_S + 60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    took = time.monotonic() - signalled
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr.decode()[-3000:]
    assert GRACE_S - 1 <= took <= GRACE_S + 30, f"ended {took:.0f} s after SIGTERM (grace {GRACE_S} s)"
    assert "after SIGTERM (stuck in a collective?)" in stderr.decode()
    assert not list(tmp_path.rglob("preempted.ckpt")), "a stuck process cannot save"
    checkpoint = latest_checkpoint(str(tmp_path))
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 6
    from kangaroo.modules import build_kangaroo
    from kangaroo.training.stage_file import load_stage_file

    model = build_kangaroo(load_stage_file(str(STAGE))["model"].architecture, load_weights=False)
    state = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    stuck = Path("/proc") / (tmp_path / "stuck").read_text() / "stat"
    for _ in range(50):  # the hung process ended too (gone, or a zombie no one has reaped yet)
        if not stuck.exists() or stuck.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung process is still alive 5 s after the run ended")


def test_resharding_a_data_position_splits_what_no_process_trained_on():
    from kangaroo.data.positions import reshard_positions, to_intervals

    # process 0 drew 0, 1, 3, 5 (3 still buffered), process 1 drew 8, 9; twelve records in all
    old = [{"loader": {}, "buffer": [3], "epoch": 1, "seen": to_intervals([0, 1, 3, 5])},
           {"loader": {}, "buffer": [], "epoch": 1, "seen": to_intervals([8, 9])}]
    assert reshard_positions(old, 0, 1, 12)["remainder"] == to_intervals([2, 3, 4, 6, 7, 10, 11])
    halves = [reshard_positions(old, rank, 2, 12) for rank in (0, 1)]
    assert [h["remainder"] for h in halves] == [to_intervals([2, 3, 4, 6]), to_intervals([7, 10, 11])]
    # resharded again while streaming those blocks: what each has not trained on yet
    again = [{**halves[0], "taken": 2, "buffer": [3]}, {**halves[1], "taken": 1}]
    assert reshard_positions(again, 0, 1, 12)["remainder"] == to_intervals([3, 4, 6, 10, 11])
    with pytest.raises(ValueError, match=r"were in different epochs \(\[1, 2\]\): resume it with 2 processes"):
        reshard_positions([old[0], {**old[1], "epoch": 2}], 0, 1, 12)
    with pytest.raises(ValueError, match="written by an older version"):
        reshard_positions([{"loader": {}, "buffer": []}, old[1]], 0, 1, 12)


def test_a_run_resumed_with_another_number_of_loader_workers_trains_on_the_rest_of_its_epoch_once(image_data, tmp_path):
    """Each worker packs its own share, so a position holds one entry per worker: with another
    number of workers the rest of the interrupted epoch is streamed first, each record once."""
    run_dir = tmp_path / "workers"
    rows = ("--data.rows_per_batch=1", "--trainer.val_check_interval=3")
    run_fit(fit_command(image_data, run_dir, *rows, "--data.num_workers=2", "--trainer.max_steps=3"))
    first = [i for line in steps_of(run_dir) for i in line["ids"]]
    assert len(first) == len(set(first)) < 30
    result = run_fit(fit_command(image_data, run_dir, *rows, "--data.num_workers=0", "--trainer.max_steps=30",
                                 "--ckpt_path=auto"))
    assert "a checkpoint of 1 processes resumes on 1 (loader workers then: 2, now: 1)" in result.stderr
    after = [i for line in steps_of(run_dir) if line["step"] >= 3 for i in line["ids"]]
    rest = after[: 30 - len(first)]
    everything = {f"img-{i}" for i in range(30)}
    assert len(rest) == len(set(rest)) and set(rest) == everything - set(first)
    assert set(after[len(rest): len(rest) + 30]) == everything, "then the next epoch, whole"


def test_two_resumes_inside_a_later_epoch_with_loader_workers_keep_the_order(image_data, tmp_path):
    """Stopped twice inside epoch 2 (8 batches an epoch), two workers: every resume continues
    the uninterrupted sequence (LitData would replay epoch 1's order on the second one if the
    saved position kept the epoch its main-process dataset was built with)."""
    workers = ("--data.num_workers=2",)
    reference = tmp_path / "reference"
    run_fit(fit_command(image_data, reference, *workers, "--trainer.max_steps=15", "--trainer.val_check_interval=15"))
    stopped = tmp_path / "stopped"
    for steps in (9, 12, 15):  # a checkpoint every 3 steps; 9 and 12 both fall in the second epoch
        run_fit(fit_command(image_data, stopped, *workers, f"--trainer.max_steps={steps}",
                            f"--trainer.val_check_interval={steps}", *(["--ckpt_path=auto"] if steps > 9 else [])))
    assert [line["step"] for line in steps_of(stopped)] == list(range(15))
    assert steps_of(stopped) == steps_of(reference)


LORA = "--model.adapters={language_model: {r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}}"


@pytest.fixture(scope="module")
def lora(image_data, uninterrupted, tmp_path_factory):
    """Stage 1 with LoRA adapters on its frozen LLM, started from the uninterrupted run's weights:
    its command's arguments and its run folder."""
    start = tmp_path_factory.mktemp("lora")
    uninterrupted_weights = start / "model.safetensors"
    from safetensors.torch import save_file

    save_file(uninterrupted[1], uninterrupted_weights)
    arguments = (LORA, f"--model.init_from={uninterrupted_weights}")
    run = start / "run"
    result = run_fit(fit_command(image_data, run, *arguments))
    assert "language_model adapters" in result.stdout + result.stderr, "the trainable table shows the adapters"
    return arguments, run


def test_lora_on_the_frozen_llm_keeps_only_what_trains_and_a_killed_run_resumes_exactly(image_data, uninterrupted,
                                                                                      lora, tmp_path):
    """Stage 1 with LoRA adapters on its frozen LLM: the loss falls, the merged weights file moves
    only the adapted layers of the LLM (the run it started from left the LLM as built), the
    checkpoint holds only what trains, and a run killed at a random step resumes from such a
    checkpoint (the frozen weights rebuilt from init_from) as if uninterrupted."""
    import json

    arguments, reference = lora
    losses = [loss for _, loss in json.loads((reference / "stage-metrics.json").read_text())["loss_history"]]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    lines, final = steps_of(reference), weights(reference)
    _, plain = uninterrupted  # init_from: the LLM as that run kept it, frozen
    assert set(final) == set(plain), "the weights file has the names of a model without adapters"
    for name, value in final.items():
        if name.startswith("language_model."):
            moved = not torch.equal(value, plain[name])
            assert moved == any(f".{layer}." in name for layer in ("q_proj", "v_proj", "down_proj")), name

    saved = torch.load(latest_checkpoint(str(reference)), weights_only=False)["state_dict"]
    adapters = {k: v for k, v in saved.items() if "lora_" in k}
    assert adapters and not [k for k in saved if k.startswith("model.language_model.") and "lora_" not in k]
    frozen = sum(v.numel() for k, v in plain.items() if k.startswith("language_model."))
    assert sum(v.numel() for v in saved.values()) == sum(v.numel() for v in plain.values()) - frozen + \
        sum(v.numel() for v in adapters.values()), "everything but the frozen LLM, and the adapters"

    run = tmp_path / "killed"
    kill_after = kill_at_a_random_step(fit_command(image_data, run, *arguments), run)
    checkpoint = latest_checkpoint(str(run))
    resumed_at = torch.load(checkpoint, weights_only=False)["global_step"]
    assert EVERY <= resumed_at <= kill_after
    result = run_fit(fit_command(image_data, run, *arguments, "--ckpt_path=auto"))
    assert f"resuming from {checkpoint}" in result.stdout
    assert_same_run(run, (lines, final), resumed_at)


def test_a_lora_stage_exports_merged_or_with_its_adapters_apart_and_both_give_the_same_logits(lora, uninterrupted,
                                                                                           tmp_path):
    """kangaroo export of the LoRA stage, from its folder and from a checkpoint (which holds only
    the adapters and the trained parts: the frozen LLM comes back from init_from): merged, the
    folder has no adapters; with --keep-adapters, its base LLM weights are the ones the stage
    started from and load_pretrained puts the adapters back; all give the adapter model's logits.
    A stage cannot start from a folder whose adapters are apart."""
    from safetensors.torch import load_file

    from conftest import collate, make_sample
    from kangaroo.inference import export_model, load_pretrained
    from kangaroo.training.weights import load_weights

    _, run = lora
    stage = str(next(run.rglob("config.yaml")))  # the stage file the fit ran, as LightningCLI saved it
    checkpoint = latest_checkpoint(str(run))
    folders = {}
    for name, source in (("folder", str(run)), ("checkpoint", checkpoint)):
        for keep in (False, True):
            folders[name, keep] = tmp_path / f"{name}-{'kept' if keep else 'merged'}"
            export_model(source, str(folders[name, keep]), stage, keep_adapters=keep)
            assert (folders[name, keep] / "adapters.safetensors").exists() == keep
    _, plain = uninterrupted
    for name in ("folder", "checkpoint"):
        base = load_file(folders[name, True] / "model.safetensors")
        merged = load_file(folders[name, False] / "model.safetensors")
        key = "language_model.model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[key], plain[key]), "the adapters moved the merged weight"
        # the folder's base is its merged weights less the update (float rounding); the checkpoint's is init_from's
        torch.testing.assert_close(base[key], plain[key], rtol=0, atol=0 if name == "checkpoint" else 1e-6)

    logits = {}
    for (name, keep), folder in folders.items():
        loaded = load_pretrained(str(folder))
        assert ("lora_A" in str(loaded.model)) == keep
        batch = collate([make_sample(loaded.model, 4, 6, seed=1), make_sample(loaded.model, 2, 3, seed=2)])
        with torch.no_grad():
            logits[name, keep] = loaded.model(**batch, return_logits=True).logits
    for name in ("folder", "checkpoint"):  # float32 sums in another order: a few ulps of logits of order 1
        torch.testing.assert_close(logits[name, True], logits[name, False], rtol=1e-5, atol=1e-5)

    # the recipe exports a stage from its weights file: merged as it is, no model built
    export_model(str(run / "model.safetensors"), str(tmp_path / "from-file"), stage)
    assert load_file(tmp_path / "from-file" / "model.safetensors").keys() == load_file(run / "model.safetensors").keys()

    model = load_pretrained(str(folders["folder", False])).model
    for path in (folders["folder", True], folders["folder", True] / "model.safetensors"):  # the folder or its file
        with pytest.raises(ValueError, match="keeps its adapters apart"):
            load_weights(model, str(path))
