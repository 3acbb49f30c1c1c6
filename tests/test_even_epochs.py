"""Epochs that end on uneven shares, as real runs have them: several processes, accumulation,
packed rows whose count per process differs. Every process takes the same micro-batches and
optimizer steps (kangaroo.data.even_epochs), a resume inside the window that holds a share's end
trains each record of the epoch once, on the same and on another number of processes, and a
process that stops answering ends the run with exit code 76 instead of a silence.

The data: 28 captioned images whose records hold 53 to 64 tokens, packed into rows of 170
tokens (two or three records a row), one row per micro-batch: on 2 processes the first epoch's
shares are 6 and 7 micro-batches, on 3 processes 4, 4 and 5."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kangaroo.training.checkpoints import latest_checkpoint
from kangaroo.training.watchdog import STALLED_EXIT_CODE
from runs import prepare_images, run, steps_of, weights

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "configs" / "kangaroo-tiny" / "1-image-pretrain.yaml"
RECORDS = 28
FSDP2 = "--trainer.strategy.class_path=kangaroo.training.fsdp.FSDP2Strategy"


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory, tiny_tokenizer_dir):
    """32 images, captions of one word for the first 16 and three for the rest (4 of those exceed
    stage 1's sample budget of 64 tokens and are rejected: 28 records)."""
    root = tmp_path_factory.mktemp("uneven-data")
    prepared = prepare_images(root, tiny_tokenizer_dir, 32, lambda i: 1 if i < 16 else 3)
    rejected = (root / "prepared" / "rejects.jsonl").read_text().splitlines()
    assert len(rejected) == 32 - RECORDS, rejected
    return prepared, tiny_tokenizer_dir


def fit_command(data: tuple[str, str], run_dir: Path, devices: int, accumulate: int, steps: int,
                *extra: str) -> list[str]:
    prepared, tokenizer = data
    return [sys.executable, "-m", "kangaroo.cli", "fit", "--config", str(STAGE), f"--trainer.devices={devices}",
            f"--trainer.accumulate_grad_batches={accumulate}", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=1000", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks+=kangaroo.training.callbacks.SampleLog",
            f"--data.train_dir={prepared}", "--data.val_dir=null", "--data.packing=true", "--data.max_tokens=170",
            "--data.rows_per_batch=1", "--data.buffer_size=4", f"--data.prepare.tokenizer={tokenizer}",
            "--model.architecture.language_model.pretrained=null",
            "--model.architecture.vision_tower.pretrained=null", *extra]


def real_micro_batches(lines: list[dict], epoch: int) -> int:
    return sum(1 for line in lines if line["epoch"] == epoch and line["ids"])


def epoch_ids(lines_by_rank: list[list[dict]], epoch: int) -> list[str]:
    return [i for lines in lines_by_rank for line in lines if line["epoch"] == epoch for i in line["ids"]]


@pytest.mark.parametrize("devices,strategy", [(2, "ddp"), (2, FSDP2), (3, "ddp")],
                         ids=["2-ddp", "2-fsdp2", "3-ddp"])
def test_uneven_shares_end_their_epochs_after_the_same_step_on_every_process(uneven_data, tmp_path, devices,
                                                                               strategy):
    """Accumulation 4 over shares of 6 and 7 (or 4, 4 and 5) micro-batches, through two epoch
    ends: the code before even epochs stepped mid-window on one process and hung for good; here
    the test's bound fails it instead."""
    option = strategy if strategy.startswith("--") else f"--trainer.strategy={strategy}"
    result = run(fit_command(uneven_data, tmp_path, devices, 4, 5, option), timeout=240)
    lines = [steps_of(tmp_path, rank) for rank in range(devices)]
    steps = [[line["step"] for line in rank_lines] for rank_lines in lines]
    assert all(s == steps[0] for s in steps), "every process ran the same micro-batches"
    assert steps[0] == [s for s in range(5) for _ in range(4)], "4 micro-batches to every step, 5 steps"
    shares = [real_micro_batches(rank_lines, 0) for rank_lines in lines]
    assert len(set(shares)) > 1, f"the shares of the first epoch differ ({shares}): the case under test"
    for epoch in (0, 1):
        ids = epoch_ids(lines, epoch)
        assert sorted(ids) == sorted(set(ids)) and len(ids) == RECORDS, f"epoch {epoch}: every record once"
    assert "empty ones added" in result.stderr + result.stdout
    assert json.loads((tmp_path / "stage-metrics.json").read_text())["steps"] == 5
    # kangaroo data stats predicted each epoch: the rows each process's loader yielded, the steps
    from kangaroo.data.stats import epoch_plan

    for epoch in (0, 1):
        plan = epoch_plan(uneven_data[0], 170, rows_per_batch=1, buffer_size=4, processes=devices, accumulate=4,
                          epoch=epoch + 1)
        assert plan.rows == plan.micro_batches == [real_micro_batches(r, epoch) for r in lines], f"epoch {epoch}"
        assert plan.steps == len({line["step"] for line in lines[0] if line["epoch"] == epoch}) == 2


def test_data_stats_prints_an_epoch_at_the_stage_budget(uneven_data, tmp_path):
    import yaml

    from kangaroo.training.stage_file import read_stage_yaml

    config = read_stage_yaml(str(STAGE))  # the files it names read in place: the copy stands alone
    config["data"].update(max_tokens=170, packing=True, rows_per_batch=1, buffer_size=4)
    config["trainer"]["accumulate_grad_batches"] = 4
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "kangaroo.cli", "data", "stats", uneven_data[0], "--stage",
                             str(stage), "--devices", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line and "epoch" not in line[:6])
    assert lines["records"].strip() == str(RECORDS)
    assert lines["rows per process"].strip() == "6/7", "as tests above saw the loaders yield"
    assert lines["empty micro-batches added"].strip() == "3"
    assert lines["optimizer steps per epoch"].strip() == "2"


def test_a_kill_in_the_window_of_a_share_end_resumes_on_two_and_on_one_process(uneven_data, tmp_path):
    """Accumulation 2: process 0's share (6 micro-batches) ends with step 3, process 1's (7) in
    step 4, the epoch's last. Killed inside step 4 and resumed from the checkpoint of step 3 (process
    0 drained there), 2 processes train exactly what the uninterrupted run trained, to the same
    weights; 1 process trains the records of that epoch no process had trained, then goes on."""
    reference = tmp_path / "uninterrupted"
    run(fit_command(uneven_data, reference, 2, 2, 6, "--trainer.strategy=ddp"), timeout=240)
    expected = [steps_of(reference, rank) for rank in (0, 1)]
    assert [real_micro_batches(lines, 0) for lines in expected] == [6, 7]

    killed = tmp_path / "killed"
    command = fit_command(uneven_data, killed, 2, 2, 6, "--trainer.strategy=ddp")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not any(line["step"] == 3 for line in steps_of(killed, 0)) and process.poll() is None:
        assert time.time() < deadline, "step 3 never started"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    checkpoint = latest_checkpoint(str(killed))
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 3, checkpoint
    positions = saved["KangarooDataModule"]["train_by_rank"]
    assert positions[0].get("drained") and not positions[1].get("drained"), "process 0's share had run out"
    before = [[line for line in steps_of(killed, rank) if line["step"] < 3] for rank in (0, 1)]

    on_two = tmp_path / "on-two"
    run(fit_command(uneven_data, on_two, 2, 2, 6, "--trainer.strategy=ddp", f"--ckpt_path={checkpoint}"),
        timeout=240)
    for rank in (0, 1):
        assert before[rank] + steps_of(on_two, rank) == expected[rank], f"process {rank}: the same micro-batches"
    final = weights(reference)
    for name, value in weights(on_two).items():
        torch.testing.assert_close(value, final[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    on_one = tmp_path / "on-one"
    result = run(fit_command(uneven_data, on_one, 1, 2, 12, f"--ckpt_path={checkpoint}"), timeout=240)
    assert "resumes on 1" in result.stderr
    rest = steps_of(on_one)
    assert rest[0]["step"] == 3 and rest[0]["epoch"] == 0
    ids = epoch_ids(before, 0) + epoch_ids([rest], 0)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == RECORDS, "every record of the epoch once"
    assert sorted(epoch_ids([rest], 1)) == sorted(set(ids)), "then the next epoch, whole, on the one process"


def _process_of_rank(run_dir: Path, rank: int) -> int:
    """The pid of the training process of ``rank`` whose command line names ``run_dir`` (the
    lowest such: loader workers are its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and f"LOCAL_RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    assert found, f"no process of rank {rank} for {run_dir}"
    return min(found)


def test_a_process_that_stops_answering_ends_the_run_with_code_76_within_the_bound(uneven_data, tmp_path):
    bound = 15
    command = fit_command(uneven_data, tmp_path, 2, 1, 200, "--trainer.strategy=ddp",
                          "--trainer.callbacks+=kangaroo.training.watchdog.StallWatchdog",
                          f"--trainer.callbacks.timeout_s={bound}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(steps_of(tmp_path, 1)) < 4:
            assert process.poll() is None and time.time() < deadline, "the run did not reach step 4"
            time.sleep(0.05)
        stopped = _process_of_rank(tmp_path, 1)
        os.kill(stopped, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        started = time.time()
        _, stderr = process.communicate(timeout=bound + 30)
        took = time.time() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == STALLED_EXIT_CODE == 76, stderr[-3000:]
    assert took <= bound + 30
    message = next(line for line in stderr.splitlines() if "made no progress" in line)
    assert "process 0 of 2" in message and " at step " in message and ", in " in message, message

    def gone() -> bool:
        try:
            return "zombie" in Path(f"/proc/{stopped}/status").read_text()
        except FileNotFoundError:
            return True

    deadline = time.time() + 10  # a killed process may still be dying (state R) as the run's exit is seen
    while not gone() and time.time() < deadline:
        time.sleep(0.1)
    assert gone(), "the stopped process was ended with the run"
    checkpoint = latest_checkpoint(str(tmp_path))
    assert checkpoint is not None and torch.load(checkpoint, weights_only=False)["global_step"] >= 1


@pytest.mark.parametrize("lora", [False, True], ids=["whole", "lora"])
def test_two_processes_across_epoch_ends_train_like_one_holding_both_shares(tmp_path, lora):
    """tests/fsdp_worker.py --uneven: shares of 7 and 5 micro-batches per epoch, accumulation 4
    on 2 processes (FSDP2 and DDP), through two epoch ends, against 1 process with accumulation 8
    whose windows hold both processes' micro-batches: the same losses, gradient norms and
    weights (an empty micro-batch adds exactly nothing). With LoRA adapters on the frozen LLM and
    tower too: under FSDP2 the adapters are sharded with their layers and merged from the
    gathered weights at the end."""
    from safetensors.torch import load_file

    from runs import WORKER, assert_same_weights

    runs = {}
    for devices, accumulate, strategy in ((1, 8, "fsdp2"), (2, 4, "fsdp2"), (2, 4, "ddp")):
        runs[devices, strategy] = tmp_path / f"{devices}-{strategy}"
        run([sys.executable, str(WORKER), "--uneven", "--devices", str(devices), "--accumulate", str(accumulate),
             "--strategy", strategy, "--steps", "5", "--out", str(runs[devices, strategy]),
             *(["--lora"] if lora else [])], timeout=240)
    reference = runs.pop((1, "fsdp2"))
    one = {name: json.loads((reference / name).read_text()) for name in ("losses.json", "grad_norms.json")}
    assert len(one["losses.json"]) == 5, "two steps an epoch: 5 steps cross two epoch ends"
    for key, out in runs.items():
        for name, expected in one.items():
            torch.testing.assert_close(torch.tensor(json.loads((out / name).read_text())), torch.tensor(expected),
                                       rtol=1e-4, atol=0, msg=lambda m: f"{key} {name}: {m}")
        assert_same_weights(out, reference, key)
        if lora:  # the adapters alone beside the merged weights, trained (peft starts B at zero)
            adapters = load_file(out / "adapters.safetensors")
            ups = [v for k, v in adapters.items() if "lora_B" in k]
            assert len(ups) == 2 * 3 + 2 and all(v.abs().max() > 0 for v in ups), sorted(adapters)
            for name, value in adapters.items():
                torch.testing.assert_close(value, load_file(reference / "adapters.safetensors")[name],
                                           rtol=1e-3, atol=1e-4, msg=lambda m: f"{key} {name}: {m}")


def test_the_schedule_follows_the_global_batch_and_the_epochs(uneven_data):
    """One process (a real Trainer, nothing fitted): global batch 8 rows of 1 -> accumulation 8;
    2.5 epochs of 13 rows -> 2 steps an epoch (ceil 13 / 8) -> max_steps 5; validation every
    3 steps -> every 24 micro-batches. A global batch the processes and rows cannot divide is
    refused, naming the values."""
    import lightning as L

    from kangaroo.data.datamodule import KangarooDataModule

    data = KangarooDataModule(uneven_data[0], max_tokens=170, packing=True, rows_per_batch=1, buffer_size=4,
                              global_batch=8, epochs=2.5, validate_every_steps=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    data.apply_schedule(trainer)
    assert trainer.accumulate_grad_batches == 8
    assert trainer.max_steps == 5
    assert trainer.val_check_interval == 24
    odd = KangarooDataModule(uneven_data[0], max_tokens=170, rows_per_batch=3, global_batch=8)
    with pytest.raises(ValueError, match=r"global_batch \(8 rows\).*rows_per_batch 3"):
        odd.apply_schedule(trainer)
