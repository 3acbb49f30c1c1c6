"""Free ports for servers the tests start as processes.

A port probed with ``bind(0)`` comes from the kernel's ephemeral range: between the probe and the
server's own bind, any outgoing connection on the machine may take it as its source port (the
S3 gateway, torchrun's store, a model server), and the server then fails to start while its
clients wait. Ports below the ephemeral range are never handed out that way."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
