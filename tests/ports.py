"""A free TCP port for a test server that binds it a moment later.

``bind(("127.0.0.1", 0))`` would hand out a port from the kernel's ephemeral range, where it can
be given again - before our server binds it - to any process that binds port 0 or connects out,
such as another test's gloo ranks running in parallel. Picking below that range avoids the race:
only explicit binds ever land there.
"""

from __future__ import annotations

import random
import socket


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    rng = random.Random()  # not the seeded global RNG: parallel workers must not pick alike
    high = _ephemeral_floor()
    low = 20000 if high > 21000 else 1024  # an unusually low ephemeral range: use what is below it
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")
