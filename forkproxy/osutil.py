"""Small operating-system helpers that several floors need (the leaves' floor: imports
only libcalls, the floor below). One copy of each, so that the master, the manager, the workers
and the shared-memory code agree on what "alive", "loopback" and "dropped" mean."""

from __future__ import annotations

import ipaddress
import mmap
import os
import signal

from forkproxy import libcalls


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lazy_buffer(size: int) -> mmap.mmap:
    """A writable buffer of ``size`` zero bytes whose pages become resident only when
    something is written to them (an anonymous mapping). ``bytearray(size)`` zero-fills,
    so every page of it is resident from the start: a 256 KiB relay buffer that carries
    a 2-byte answer would cost 256 KiB instead of 4. Supports what the workers do with
    their buffers: ``recv_into``, ``memoryview``, ``find``, ``len``."""
    return mmap.mmap(-1, size)


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when our parent (the master) dies. A second line
    of defence besides the lifeline pipe."""
    libcalls.set_pdeathsig(sig)


def sync_file_range_writer():
    """``write(fd, offset, nbytes)``: start writeback of a file range and return without
    waiting for it (sync_file_range(2) with SYNC_FILE_RANGE_WRITE; ``os`` has no binding).
    Unlike ``posix_fadvise(DONTNEED)`` it never tries to drop the pages, so a range that
    is still dirty costs no drain of every CPU's LRU caches. OSError on failure, and
    AttributeError where libc lacks it."""
    if not libcalls.has_sync_file_range():
        raise AttributeError("this libc has no sync_file_range")
    return libcalls.start_writeback


def drop_privileges(uid: int | None, gid: int | None, groups: list[int] | None) -> bool:
    """setgroups, setgid, setuid, in that order (after setuid the others are refused).
    Returns whether anything was dropped (``uid`` None: the master was not root)."""
    if uid is None:
        return False
    if groups is not None:
        os.setgroups(groups)
    if gid is not None:
        os.setgid(gid)
    os.setuid(uid)
    return True


def is_loopback(host: str, iface: str = "") -> bool:
    """Whether a listen address (a host, or an interface name) is reachable only from
    this machine: "lo", "localhost", 127.0.0.0/8, ::1."""
    if iface:
        return iface == "lo"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
