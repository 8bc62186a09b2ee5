"""Write-behind: an appended file keeps at most a few windows of itself in the page cache.

Why: a busy access log appends hundreds of MB/s, and each new page-cache page it grows
into costs the writer a page allocation. Left alone, the kernel writes the log back only
after ``dirty_expire_centisecs`` (30 s) or past the dirty limits, and keeps the clean
pages until memory runs short: on a VM whose host takes back guest memory the guest has
not used for a while (Firecracker here), such a page costs 8-11 µs instead of 1.4-1.8;
on a bare-metal host the log evicts page cache that is worth more and builds a large
dirty backlog that later stalls writers on the dirty limits. As PostgreSQL's
``backend_flush_after`` or RocksDB's ``bytes_per_sync``: every ``window`` bytes this
process appends, ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts asynchronous
writeback of the new window, and ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops the
window written back one mark earlier (and again the one before it, for pages that were
still under writeback then). Freed pages are reused by the next writes, so the file
stops touching new memory.

Why two calls: ``posix_fadvise`` on a range that still has dirty pages starts their
writeback too, but it then fails to drop them and drains every CPU's LRU caches
(``lru_add_drain_all``), waiting on a kworker of each busy CPU: 30-80 ms stalls of the
collector in scripts/replay-bench with 32 producers on the other CPU.

A file truncated under the writer (logrotate's ``copytruncate``) restarts the windows
at offset 0. Only for regular files: pipes, ttys and character devices are left alone. On tmpfs
nothing is dropped (tmpfs pages are the file). Offsets are the file's own (the position
after each ``O_APPEND`` write), so several processes appending to one file (collector
shards) each cover the whole file between their marks.
"""

from __future__ import annotations

import os
import stat
import time

from forkproxy.osutil import sync_file_range_writer

#: marks kept: the newest window's start and end, the window being dropped, the one before
_MARKS = 4


class WriteBehind:
    """Window bookkeeping of one open file; ``wrote`` after each successful append."""

    __slots__ = ("fd", "window", "since", "marks", "kick", "calls", "call_seconds",
                 "call_max", "kick_seconds")

    def __init__(self, fd: int, window: int):
        self.fd = fd
        self.window = window if window > 0 and _regular(fd) else 0
        self.since = 0  # bytes appended by this process since the last mark
        self.marks: list[int] = []
        self.calls = 0  # windows handled
        self.call_seconds = 0.0  # wall time in the two calls: the writer waits on them
        self.call_max = 0.0
        self.kick_seconds = 0.0  # of which in sync_file_range (the rest: dropping pages)
        self.kick = None
        if self.window:
            try:
                self.kick = sync_file_range_writer()
                self.marks.append(os.lseek(fd, 0, os.SEEK_END))
            except (OSError, AttributeError):
                self.window = 0

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def wrote(self, n: int) -> None:
        if self.window:
            self.since += n
            if self.since >= self.window:
                self.advance()

    def advance(self) -> None:
        """Start writeback of the bytes since the last mark; drop the windows before."""
        self.since = 0
        fd, marks = self.fd, self.marks
        try:
            end = os.lseek(fd, 0, os.SEEK_CUR)
            if end < marks[-1]:  # truncated under us (logrotate's copytruncate)
                marks[:] = [0]
            if end <= marks[-1]:
                return
            t0 = time.perf_counter()
            self.kick(fd, marks[-1], end - marks[-1])
            t1 = time.perf_counter()
            marks.append(end)
            if len(marks) > _MARKS:
                del marks[0]
            if len(marks) > 2:
                os.posix_fadvise(fd, marks[0], marks[-2] - marks[0], os.POSIX_FADV_DONTNEED)
            took = time.perf_counter() - t0
        except OSError:
            self.window = 0  # a file system that refuses: writes go on without it
            return
        self.calls += 1
        self.call_seconds += took
        self.kick_seconds += t1 - t0
        self.call_max = max(self.call_max, took)

    def finish(self) -> None:
        """Before the file is closed (reopen, reconfigure, exit): the tail's writeback."""
        if self.window and self.since:
            self.advance()


def _regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
