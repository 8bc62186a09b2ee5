"""The rendezvous of the worker debug protocol (see manager/profiling.py for the whole
story): the realtime signal the manager sends, the abstract Unix socket both sides meet
on, and the limits both enforce. The lowest floor: the manager and the workers, which
may not import each other, both import it."""

from __future__ import annotations

import signal

DEBUG_SIGNAL = signal.SIGRTMIN + 6
MAX_SECONDS = 120.0
MAX_HZ = 1000
CONNECT_TIMEOUT = 2.0


def socket_name(master_pid: int, worker_pid: int) -> bytes:
    """Abstract Unix socket name (nothing in the file system, gone with the socket)."""
    return b"\0forkproxy-debug-%d-%d" % (master_pid, worker_pid)
