"""Several machines, simulated on this one: two "nodes" of one process each on 127.0.0.1, launched
by Lightning's own launcher reading ``NODE_RANK``/``MASTER_ADDR`` (by hand or another launcher)
and by ``torchrun --nnodes 2``, train as one process holding both rows does. (SLURM's own
variables, read by Lightning's ``SLURMEnvironment``, are not simulated here.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ports import free_port
from runs import FSDP, WORKER, assert_same_weights, fit_command

TIMEOUT = 300


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]], logs: Path) -> None:
    """Starts one process group per "node", its output in a file (no pipe to fill while another
    node is waited on), and waits for all of them within ``TIMEOUT`` together."""
    import time

    processes, files = [], []
    for index, (command, env) in enumerate(zip(commands, envs)):
        files.append(open(logs / f"{logs.name}-node{index}.log", "w+"))
        processes.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=files[-1],
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    if any(p.poll() is None for p in processes):
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        tails = []
        for index, handle in enumerate(files):
            handle.seek(0)
            tails.append(f"--- node {index} (exit {processes[index].poll()}) ---\n{handle.read()[-3000:]}")
        pytest.fail(f"the nodes did not finish within {TIMEOUT} s\n" + "\n".join(tails))
    for process, handle in zip(processes, files):
        handle.seek(0)
        output = handle.read()
        handle.close()
        assert process.returncode == 0, output[-3000:]


def torchrun(node: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]


def test_two_nodes_train_like_one_process_holding_both_rows(tmp_path):
    # tests/fsdp_worker.py: the same global batches whatever the number of processes (FSDP2 over 2)
    one = tmp_path / "one"
    run_nodes([[sys.executable, str(WORKER), "--devices", "1", "--out", str(one)]], [{}], tmp_path)
    port = free_port()
    by_env = tmp_path / "node-rank"
    run_nodes([[sys.executable, str(WORKER), "--devices", "1", "--num-nodes", "2", "--out", str(by_env)]] * 2,
              [{"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for node in (0, 1)],
              tmp_path)
    assert (by_env / "media.rank1.json").exists(), "the second node trained as rank 1"
    assert_same_weights(by_env, one, "NODE_RANK launch")

    port = free_port()
    by_torchrun = tmp_path / "torchrun"
    run_nodes([[*torchrun(node, port), str(WORKER), "--devices", "1", "--num-nodes", "2", "--out", str(by_torchrun)]
               for node in (0, 1)], [{}, {}], tmp_path)
    assert (by_torchrun / "media.rank1.json").exists()
    assert_same_weights(by_torchrun, one, "torchrun launch")


def test_kangaroo_fit_on_two_torchrun_nodes_equals_two_processes_on_one(image_data, tmp_path):
    steps = ("--trainer.max_steps=6", "--trainer.val_check_interval=6")
    sharded = FSDP[1:]  # FSDP2Strategy with activation checkpointing, without the device count
    one_node = tmp_path / "one-node"
    run_nodes([fit_command(image_data, one_node, "--trainer.devices=2", *sharded, *steps)], [{}], tmp_path)
    port = free_port()
    nodes = tmp_path / "two-nodes"
    commands = []
    for node in (0, 1):
        command = fit_command(image_data, nodes, "--trainer.devices=1", "--trainer.num_nodes=2", *sharded, *steps)
        assert command[1:3] == ["-m", "kangaroo.cli"]
        commands.append([*torchrun(node, port), *command[1:]])
    run_nodes(commands, [{}, {}], tmp_path)
    assert_same_weights(nodes, one_node, "kangaroo fit on two torchrun nodes")
