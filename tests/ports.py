"""Ports for servers the tests start as processes, and waiting for them to answer.

A port probed with ``bind(0)`` comes from the kernel's ephemeral range: between the probe and the
server's own bind, any outgoing connection on the machine may take it as its source port (the
S3 gateway, torchrun's store, a model server), and the server then fails to start while its
clients wait. Ports below the ephemeral range are never handed out that way."""

from __future__ import annotations

import random
import socket
import subprocess
import time

import httpx
import pytest


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 12000), low))
    # the system's randomness, not the `random` module's: a test that seeds it (seed_everything in
    # the test process) would make every pytest-xdist worker draw the same ports
    random.SystemRandom().shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Waits for ``url`` to answer 200, failing with the process's output if it ends first."""
    deadline = time.time() + seconds
    while True:
        if process.poll() is not None:
            output = process.stderr if process.stderr is not None else process.stdout
            pytest.fail(f"{process.args[:4]} ended: {output.read()[-3000:] if output else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{url} did not come up in {seconds:.0f} s"
        time.sleep(0.2)
