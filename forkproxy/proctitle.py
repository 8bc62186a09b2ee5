"""Process names (/proc/PID/comm, shown by ps and top) so operators and tests can tell
the master's children apart: fp-worker-N, fp-manager."""

from __future__ import annotations

from forkproxy import libcalls


def set_name(name: str) -> None:
    """Name this process; the kernel keeps the first 15 bytes."""
    libcalls.set_name(name)
