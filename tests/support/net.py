"""Loopback networking for the tests' local servers."""

from __future__ import annotations

import itertools
import os
import random
import re
import socket

# Ports for servers the tests start in another process (serve, torchrun's rendezvous), which
# cannot bind port 0 and report back. Below Linux's ephemeral range (32768-60999), so no
# client socket or bind(0) anywhere takes one; each pytest-xdist worker (gw0, gw1, ...) draws
# from its own slice, so two workers never hand out the same port between check and bind.
# In-process servers bind port 0 instead and read the port they got.
_FIRST, _SLICE, _SLICES = 20000, 1000, 12
_WORKER = int((re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", "")) or [0, 0])[1]) % _SLICES
_START = random.Random(os.getpid()).randrange(_SLICE)  # two separate runs start apart
_next = itertools.count()


def free_port() -> int:
    """A loopback port that was free a moment ago and that no other worker of this run hands out."""
    for _ in range(_SLICE):
        port = _FIRST + _WORKER * _SLICE + (_START + next(_next)) % _SLICE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken (another run on the box, or a server still in TIME_WAIT)
                continue
            return port
    raise RuntimeError(f"no free port in {_FIRST + _WORKER * _SLICE}+{_SLICE}")
