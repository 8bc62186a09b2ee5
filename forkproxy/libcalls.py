"""The libc calls forkproxy makes that ``os`` has no binding for: ``prctl`` (the process
name, the parent-death signal), ``malloc_trim`` and ``sync_file_range``.

Compiled (setup.py's COMPILED, libcalls.pxd) each is a direct C call. As plain Python
they go through ctypes, imported only then: ctypes, ``_ctypes`` and libffi cost every
process of the tree ~0.4 MiB resident that the compiled build does not pay
(docs/BENCHMARKS.md, "Memory"). The lowest floor: imports nothing from forkproxy.
"""

from __future__ import annotations

import os

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False

if not COMPILED:
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
    _SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_uint]

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
SYNC_FILE_RANGE_WRITE = 2
#: the kernel keeps 15 bytes of a process name (16 with the NUL)
NAME_MAX = 15


def set_name(name: str) -> None:
    """Name this process (/proc/PID/comm, what ps and top show); longer names are cut
    to 15 bytes, as the kernel would."""
    raw = name.encode()[:NAME_MAX]
    if COMPILED:
        fp_set_name(raw)  # noqa: F821 - libcalls.pxd
    else:
        _LIBC.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    if COMPILED:
        fp_set_pdeathsig(sig)  # noqa: F821 - libcalls.pxd
    else:
        _LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def has_malloc_trim() -> bool:
    """Whether this libc has ``malloc_trim`` (glibc does; the compiled build needs it)."""
    return COMPILED or hasattr(_LIBC, "malloc_trim")


def malloc_trim() -> None:
    """Give the free pages of every malloc arena back to the OS (``malloc_trim(0)``)."""
    if COMPILED:
        fp_malloc_trim()  # noqa: F821 - libcalls.pxd
    else:
        _LIBC.malloc_trim(ctypes.c_size_t(0))


def has_sync_file_range() -> bool:
    """Whether this libc has ``sync_file_range`` (glibc does; the compiled build needs it)."""
    return COMPILED or _SYNC_FILE_RANGE is not None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writeback of a file range and return without waiting for it
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``); OSError on failure."""
    if COMPILED:
        err = fp_start_writeback(fd, offset, nbytes)  # noqa: F821 - libcalls.pxd
    elif _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0:
        err = 0
    else:
        err = ctypes.get_errno()
    if err:
        raise OSError(err, os.strerror(err))
