"""``kangaroo recipe run`` on every node of an allocation.

Node 0 owns the recipe: it reads and writes ``recipe-state.json``, generates the world, prepares
each stage's data, exports the model folders and writes the summary. Every other node follows it
stage by stage: it receives the stage's merged config and resume checkpoint from node 0, starts
its own part of the stage's fit (``trainer.num_nodes`` processes groups rendezvous through
Lightning at ``MASTER_ADDR:MASTER_PORT``), and waits for node 0's verdict before the next stage.

The runners talk through a ``torch.distributed.TCPStore`` that node 0 hosts at
``MASTER_ADDR:coordinator_port`` (torch's own key-value store, the one process groups rendezvous
through: no second service to deploy). Each runner bumps a heartbeat counter every second from a
thread; a runner whose counter has not moved for ``node_timeout`` seconds, or whose store
connection broke, is dead: node 0 kills its own fit and marks the stage failed, followers kill
theirs and exit. A dead node therefore stops the stage on every node within ``node_timeout``
(plus a second of polling); running the same command again on every node resumes it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

HEARTBEAT_S = 1.0
POLL_S = 0.5


class NodeLost(RuntimeError):
    """Another node of the recipe stopped answering (its runner died, or its machine)."""


class NodeAborted(NodeLost):
    """Node 0 stopped the recipe (its error is in the message)."""


class StageEnded(NodeLost):
    """Node 0 ended the stage (failed or preempted) while this node's part still ran."""


@dataclass
class NodeSetup:
    """Where this runner stands in the allocation."""

    num_nodes: int = 1
    node_rank: int = 0
    address: str = "127.0.0.1"
    port: int = 0
    node_timeout: float = 120.0
    join_timeout: float = 900.0

    @property
    def leader(self) -> bool:
        return self.node_rank == 0

    @classmethod
    def from_environment(cls, num_nodes: int | None = None, node_rank: int | None = None,
                         port: int | None = None, node_timeout: float = 120.0, join_timeout: float = 900.0,
                         environ: dict[str, str] | None = None) -> "NodeSetup":
        """The arguments, else the environment: ``SLURM_NNODES``/``SLURM_NODEID`` under SLURM,
        ``NODE_RANK`` (Lightning's own variable) otherwise; ``MASTER_ADDR`` and ``MASTER_PORT``
        name node 0 (the coordinator listens on ``MASTER_PORT + 1`` unless ``port`` is given)."""
        env = os.environ if environ is None else environ
        nodes = num_nodes if num_nodes is not None else int(env.get("SLURM_NNODES", 1))
        if nodes < 1:
            raise ValueError(f"--num-nodes must be at least 1, got {nodes}")
        if nodes == 1:
            return cls(node_timeout=node_timeout, join_timeout=join_timeout)
        if node_rank is None:
            found = env.get("NODE_RANK", env.get("SLURM_NODEID"))
            if found is None:
                raise ValueError(f"{nodes} nodes, but this one's rank is unknown: pass --node-rank or set NODE_RANK "
                                 "(SLURM sets SLURM_NODEID)")
            node_rank = int(found)
        if not 0 <= node_rank < nodes:
            raise ValueError(f"node rank {node_rank} is outside 0..{nodes - 1}")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ValueError(f"{nodes} nodes need {' and '.join(missing)} set on every node: the address of node 0 "
                             "and the port its training processes rendezvous on")
        if port is None:
            port = int(env["MASTER_PORT"]) + 1
        return cls(nodes, node_rank, env["MASTER_ADDR"], port, node_timeout, join_timeout)

    def fit_environment(self) -> dict[str, str]:
        """The environment of this node's fit: Lightning reads its node's rank from ``NODE_RANK``.
        SLURM's task variables are removed: the runner is SLURM's one task on this node and the
        fit launches its processes itself (Lightning would otherwise count tasks against devices)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["NODE_RANK"] = str(self.node_rank)
        return env


class Coordinator:
    """The runners' link: node 0 hosts the store, the others connect to it.

    Node 0 publishes ``stage/<i>`` (what to run next, or the end) and ``verdict/<i>`` (how stage
    ``i`` ended); every node publishes ``beat/<node>``. Reads never block past ``POLL_S``: every
    wait checks the other nodes' heartbeats in between.
    """

    def __init__(self, setup: NodeSetup) -> None:
        from torch.distributed import TCPStore

        self.setup = setup
        joining = datetime.timedelta(seconds=setup.join_timeout)
        # every call on a follower's link waits at most node_timeout: a machine that vanished
        # sends no reset, and a call would otherwise wait for the store's timeout
        working = datetime.timedelta(seconds=max(5.0, setup.node_timeout))
        try:
            self.store = TCPStore(setup.address, setup.port, setup.num_nodes, setup.leader, timeout=joining,
                                  wait_for_workers=False)
            if not setup.leader:  # connected (node 0 may start later): now the links that are used
                self.store = TCPStore(setup.address, setup.port, setup.num_nodes, False, timeout=working)
            # the heartbeat thread has a connection of its own
            self._beat_store = TCPStore(setup.address, setup.port, setup.num_nodes, False, timeout=working)
        except Exception as err:  # noqa: BLE001 - torch raises several kinds for one cause
            role = "listen on" if setup.leader else "reach node 0 at"
            raise NodeLost(f"could not {role} {setup.address}:{setup.port} within {setup.join_timeout:.0f} s: {err}")
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._beat_error: Exception | None = None
        self._thread = threading.Thread(target=self._beat, daemon=True, name="kangaroo-heartbeat")
        self._thread.start()

    # -- liveness ------------------------------------------------------------------------------

    def _beat(self) -> None:
        key = f"beat/{self.setup.node_rank}"
        while not self._stop.is_set():
            try:
                self._beat_store.add(key, 1)
            except Exception as err:  # noqa: BLE001
                self._beat_error = err
                return
            self._stop.wait(HEARTBEAT_S)

    def peers(self) -> list[int]:
        return [0] if not self.setup.leader else list(range(1, self.setup.num_nodes))

    def check(self, peers: list[int] | None = None) -> None:
        """Raises ``NodeLost`` when a peer's heartbeat stood still for ``node_timeout`` seconds or
        the store is gone, and ``NodeAborted`` when node 0 gave up."""
        now = time.monotonic()
        if not self.setup.leader:
            self._aborted()
        for node in self.peers() if peers is None else peers:
            try:
                count = self.store.add(f"beat/{node}", 0)
            except Exception as err:  # noqa: BLE001
                raise NodeLost(f"the link to node 0 broke ({err}): its runner or machine is gone")
            last = self._seen.get(node)
            if last is None or last[0] != count:
                self._seen[node] = (count, now)
            elif now - last[1] > self.setup.node_timeout:
                raise NodeLost(f"node {node} gave no sign of life for {self.setup.node_timeout:.0f} s")
        if self._beat_error is not None:
            raise NodeLost(f"the link to node 0 broke ({self._beat_error}): its runner or machine is gone")

    def joined(self) -> None:
        """Node 0: waits until every node has connected (``join_timeout``)."""
        self.store.add(f"joined/{self.setup.node_rank}", 1)
        if not self.setup.leader:
            return
        deadline = time.monotonic() + self.setup.join_timeout
        missing = self.peers()
        while missing:
            missing = [n for n in missing if not self.store.check([f"joined/{n}"])]
            if missing and time.monotonic() > deadline:
                raise NodeLost(f"nodes {missing} did not join within {self.setup.join_timeout:.0f} s; start "
                               "`kangaroo recipe run` on every node of the allocation")
            time.sleep(POLL_S)
        self._seen.clear()  # heartbeats count from now

    # -- messages ------------------------------------------------------------------------------

    def publish(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(key, json.dumps(value))

    def report(self, index: int, returncode: int) -> None:
        """A follower: how its part of stage ``index`` ended."""
        self.store.set(f"result/{index}/{self.setup.node_rank}", str(returncode))

    def check_stage(self, index: int) -> None:
        """Node 0, while its fit of stage ``index`` runs: ``check()``, and ``NodeLost`` when a
        follower's part of the stage failed (any exit but 0 and the preemption code): node 0's own
        processes would otherwise wait in a collective for its timeout (NCCL's: 30 minutes)."""
        from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE

        self.check()
        for node in self.peers():
            key = f"result/{index}/{node}"
            if self.store.check([key]):
                code = int(self.store.get(key))
                if code not in (0, PREEMPTED_EXIT_CODE):
                    raise NodeLost(f"node {node}'s part of the stage ended with exit code {code} (its log says why)")

    def check_follower(self, index: int) -> None:
        """A follower, while its fit of stage ``index`` runs: ``check()``, and ``StageEnded`` when
        node 0 already gave a verdict that ends the run (its part stopped first: this one's
        processes, waiting in a collective, would otherwise wait for its timeout)."""
        self.check()
        key = f"verdict/{index}"
        if self.store.check([key]) and json.loads(self.store.get(key))["status"] != "done":
            raise StageEnded(f"node 0 ended stage {index}")

    def acknowledge(self, index: int) -> None:
        """A follower has read the verdict of stage ``index``."""
        self.store.add(f"verdict-read/{index}/{self.setup.node_rank}", 1)

    def wait_acknowledged(self, index: int) -> None:
        """Node 0, after a verdict that ends the run: waits for every live follower to have read
        it (so that none takes the closed store for a dead node 0 and exits with another code)."""
        self._await_followers(f"verdict-read/{index}")

    def _await_followers(self, key: str) -> None:
        """Node 0: waits until every follower has set ``key/<node>``; one found dead is not waited for."""
        for node in self.peers():
            try:
                while not self.store.check([f"{key}/{node}"]):
                    self.check([node])
                    time.sleep(POLL_S)
            except NodeLost:
                pass

    def abort(self, reason: str) -> None:
        """Node 0 gave up (an error, a failed stage): followers stop their fits and exit. Waits a
        few seconds for them to have seen it, so that they report the reason, not a lost link."""
        try:
            self.store.set("abort", reason)
            deadline = time.monotonic() + 5 * POLL_S
            while time.monotonic() < deadline and not all(self.store.check([f"aborted/{n}"]) for n in self.peers()):
                time.sleep(POLL_S / 5)
        except Exception:  # noqa: BLE001 - the store may be what failed
            pass

    def _aborted(self) -> None:
        try:
            stopped = self.store.check(["abort"])
            reason = self.store.get("abort").decode() if stopped else None
            if stopped:
                self.store.add(f"aborted/{self.setup.node_rank}", 1)
        except Exception as err:  # noqa: BLE001
            raise NodeLost(f"the link to node 0 broke ({err}): its runner or machine is gone")
        if stopped:
            raise NodeAborted(f"node 0 stopped the recipe: {reason}")

    def receive(self, key: str) -> dict[str, Any]:
        """Waits for ``key`` from node 0, watching its heartbeat meanwhile."""
        while not self.store.check([key]):
            self.check()
            time.sleep(POLL_S)
        return json.loads(self.store.get(key))

    def finish(self) -> None:
        """Node 0 waits for every follower to have read the end (so that none takes the closed
        store for a dead node 0); followers say they have. Then the heartbeat stops."""
        if self.setup.leader:
            self._await_followers("finished")
        else:
            self.store.add(f"finished/{self.setup.node_rank}", 1)
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children, grandchildren: a fit's local ranks and loader workers),
    read from ``/proc``; empty where there is none."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILLs a fit and every process below it. A fit whose peer node is gone cannot save a
    checkpoint (saving is collective), so nothing is lost that a gentler stop would keep."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def run_watched(command: list[str], watch: Callable[[], None] | None = None,
                env: dict[str, str] | None = None) -> int:
    """Runs a stage's fit, passing SIGTERM on to it (it finishes its step, saves and exits with
    ``PREEMPTED_EXIT_CODE``: the runner waits for that instead of dying first and leaving the
    state file at "running"). With other nodes, ``watch`` checks them meanwhile: a dead node, or
    a failed part of the stage, ends this node's fit at once (``NodeLost``)."""
    process = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if watch is not None:
                try:
                    watch()
                except NodeLost:
                    kill_tree(process)
                    raise
    finally:
        signal.signal(signal.SIGTERM, previous)
