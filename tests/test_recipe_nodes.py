"""``kangaroo recipe run`` on two "nodes" of this machine (one runner each, ``NODE_RANK`` 0 and 1,
``MASTER_ADDR=127.0.0.1``): node 0 keeps the one state file and prepares each dataset once, both
run every stage's fit as one 2-process job; killing node 1's runner during stage 2 stops node 0
within the node timeout, and running the command again on both resumes stage 2 from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kangaroo.recipe import NodeSetup
from ports import free_port
from recipes import chain_recipe

NODE_TIMEOUT = 10
STOP_BOUND = NODE_TIMEOUT + 15  # the timeout, the poll, and the kill of the fit's processes


def start_nodes(recipe: str, work: Path, logs: Path, run: int,
                extra_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    master, coordinator = free_port(), free_port()
    processes = []
    for node in (0, 1):
        env = {**os.environ, "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master),
               **(extra_env or {}).get(node, {})}
        log = open(logs / f"run{run}-node{node}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "kangaroo.cli", "recipe", "run", recipe, "--workdir", str(work), "--num-nodes", "2",
             "--coordinator-port", str(coordinator), "--node-timeout", str(NODE_TIMEOUT)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return processes


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def wait_all(processes: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"a runner did not end within {seconds} s")


def test_recipe_on_two_nodes_one_state_one_preparation_and_a_dead_node_stops_the_stage(small_world, tmp_path):
    # stage 2 runs long enough (80 steps, a few a second) that node 0 notices the dead node before it ends
    recipe = chain_recipe(tmp_path, small_world, stage3_steps=80, count=3, long_stage=2)
    work, logs = tmp_path / "work", tmp_path / "logs"
    logs.mkdir()
    log = lambda run, node: (logs / f"run{run}-node{node}.log").read_text()  # noqa: E731

    first = start_nodes(recipe, work, logs, 1)
    stage2 = work / "2-video-pretrain" / "checkpoints"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not list(stage2.glob("*step=*")):
        assert all(p.poll() is None for p in first), log(1, 0)[-3000:] + log(1, 1)[-3000:]
        time.sleep(0.5)
    assert list(stage2.glob("*step=*")), "stage 2 wrote no checkpoint in time"
    # Node 1's runner dies alone: its fit goes on training with node 0 (nothing fails in any
    # collective), so only the runners' heartbeats can tell. Node 0 stops its fit within the
    # timeout; the orphaned fit then loses its peer and ends too.
    os.kill(first[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    first[1].wait()
    wait_all(first[:1], STOP_BOUND + 30)
    stopped_after = time.monotonic() - killed
    assert first[0].returncode == 1, log(1, 0)[-3000:]
    assert stopped_after < STOP_BOUND, f"node 0 ran on for {stopped_after:.0f} s after node 1's runner died"
    assert f"stage '2-video-pretrain' stopped: node 1 gave no sign of life for {NODE_TIMEOUT} s" in log(1, 0), \
        log(1, 0)[-3000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and group_alive(first[1].pid):
        time.sleep(0.5)
    assert not group_alive(first[1].pid), "node 1's fit outlived its stage"
    state = json.loads((work / "recipe-state.json").read_text())
    assert [state["stages"][n]["status"] for n in sorted(state["stages"])] == ["done", "failed", "pending"]
    # both nodes ran stage 1 as one job of two processes
    assert "[1-image-pretrain] node 1:" in log(1, 1) and "--trainer.num_nodes=2" in log(1, 1)
    assert "GLOBAL_RANK: 1" in log(1, 1)

    second = start_nodes(recipe, work, logs, 2)
    wait_all(second, 500)
    assert [p.returncode for p in second] == [0, 0], log(2, 0)[-3000:] + log(2, 1)[-3000:]
    assert "[2-video-pretrain] resuming from" in log(2, 0)
    assert "[1-image-pretrain]" not in log(2, 0) + log(2, 1), "a done stage ran again"
    assert "[3-pretrain-refinement] node 1:" in log(2, 1) and "--ckpt_path=" in log(2, 1).split("[3-pretrain")[0]
    state = json.loads((work / "recipe-state.json").read_text())
    assert all(entry["status"] == "done" for entry in state["stages"].values())
    assert state["stages"]["2-video-pretrain"]["metrics"]["steps"] == 80

    # One preparation per dataset, all by node 0; node 1 wrote no state and no summary of its own.
    assert "preparing" not in log(1, 1) + log(2, 1)
    prepared = [line for run in (1, 2) for line in log(run, 0).splitlines() if "] preparing " in line]
    assert len(prepared) == 6 == len(set(prepared)), prepared  # three stages, train and val
    assert "summary" not in log(2, 1).lower()
    assert (work / "summary.json").exists()


FAILING_FIT = """
import os, sys
if os.environ.get("FAIL_FIT") and "fit" in sys.argv and "recipe" not in sys.argv:
    sys.stderr.write("this node's fit fails at start\\n")
    os._exit(3)
"""


def test_a_follower_whose_fit_fails_stops_node_0_at_once(small_world, tmp_path):
    """Node 1's fit dies at start: node 0's fit would wait for it in the rendezvous (for the
    process group's timeout); the reported exit code stops it, and both runners exit 1."""
    recipe = chain_recipe(tmp_path, small_world, count=1)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_FIT)  # runs at the start of every Python process of node 1
    work, logs = tmp_path / "work", tmp_path / "logs"
    logs.mkdir()
    runners = start_nodes(recipe, work, logs, 1, {1: {"FAIL_FIT": "1", "PYTHONPATH": str(hook)}})
    wait_all(runners, 300)
    node0, node1 = ((logs / f"run1-node{n}.log").read_text() for n in (0, 1))
    assert [p.returncode for p in runners] == [1, 1], node0[-3000:] + node1[-3000:]
    assert "this node's fit fails at start" in node1
    assert "stage '1-image-pretrain' stopped: node 1's part of the stage ended with exit code 3" in node0, node0[-3000:]
    assert "stage '1-image-pretrain' failed" in node1, node1[-3000:]
    state = json.loads((work / "recipe-state.json").read_text())
    assert state["stages"]["1-image-pretrain"]["status"] == "failed"


def test_node_setup_reads_the_launchers_variables():
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    single = NodeSetup.from_environment(environ={"NODE_RANK": "1"})
    assert (single.num_nodes, single.node_rank) == (1, 0)
    setup = NodeSetup.from_environment(2, environ={**env, "NODE_RANK": "1"})
    assert (setup.num_nodes, setup.node_rank, setup.address, setup.port, setup.leader) == (2, 1, "10.0.0.1", 29501, False)
    slurm = NodeSetup.from_environment(environ={**env, "SLURM_NNODES": "4", "SLURM_NODEID": "3"})
    assert (slurm.num_nodes, slurm.node_rank) == (4, 3)
    with pytest.raises(ValueError, match="this one's rank is unknown"):
        NodeSetup.from_environment(2, environ=env)
    with pytest.raises(ValueError, match="need MASTER_ADDR set"):
        NodeSetup.from_environment(2, 0, environ={"MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="outside 0..1"):
        NodeSetup.from_environment(2, 2, environ=env)
