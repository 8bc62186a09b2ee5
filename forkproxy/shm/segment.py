"""Shared mappings that never outlive their processes.

A segment is created with ``shm_open(O_CREAT|O_EXCL)``, mapped, and its name is
unlinked before :func:`create_mapping` returns, i.e. before any fork. The mapping
stays valid in the creator and in every child forked afterwards (they inherit it),
but there is nothing left in ``/dev/shm`` to clean up: a SIGKILLed master leaves no
segment behind and the next start cannot collide with a stale one. The kernel frees
the memory when the last process that maps it exits.

The only leak window is the few microseconds between ``shm_open`` and ``shm_unlink``;
:func:`sweep_stale` removes what a process killed inside that window left behind.

Unrelated processes cannot attach (the name is gone) and an exec'd process does not
inherit the mapping; neither is needed by the prefork design.
"""

from __future__ import annotations

import mmap
import os

import posix_ipc

from forkproxy.osutil import pid_alive

PREFIX = "forkproxy."
SHM_DIR = "/dev/shm"


def segment_name(purpose: str) -> str:
    """``/forkproxy.<pid>.<purpose>.<random>``: the pid says who made it (see sweep_stale)."""
    if not purpose or "/" in purpose or "." in purpose:
        raise ValueError(f"bad segment purpose {purpose!r}")
    return f"/{PREFIX}{os.getpid()}.{purpose}.{os.urandom(6).hex()}"


def create_mapping(purpose: str, size: int) -> mmap.mmap:
    """Create, map and immediately unlink a POSIX shared memory segment of ``size`` bytes.

    The result is a ``MAP_SHARED`` read-write mapping, zero-filled and page-aligned.
    """
    if size <= 0:
        raise ValueError("size must be positive")
    for _ in range(8):
        try:
            shm = posix_ipc.SharedMemory(
                segment_name(purpose), posix_ipc.O_CREX, mode=0o600, size=size
            )
            break
        except posix_ipc.ExistentialError:  # 48 random bits collided: try another name
            continue
    else:
        raise RuntimeError("could not create a unique shared memory segment")
    try:
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()
        shm.unlink()


def sweep_stale() -> list[str]:
    """Unlink ``/dev/shm/forkproxy.<pid>.*`` entries whose creator no longer exists.

    Only a process SIGKILLed between shm_open and shm_unlink leaves one. Entries of a live
    pid (or a recycled one) are kept: removing a name never breaks an existing mapping,
    but we stay conservative. Returns the names removed.
    """
    removed = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.startswith(PREFIX):
            continue
        pid_text = entry[len(PREFIX) :].split(".", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
            removed.append(entry)
        except posix_ipc.ExistentialError:
            pass
    return removed



