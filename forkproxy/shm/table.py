"""The worker table: one 64-byte entry per worker, in an anonymous shared mapping.

Created by the master before any fork (MAP_SHARED|MAP_ANONYMOUS: inherited by every
child, never visible in /dev/shm, gone with the last process). The master fills the
identity fields when it forks a worker; the worker writes its heartbeat and counters
once a second (not per request); the master reads heartbeats to find stuck workers and
the manager reads everything for /status. Each field is an aligned 8-byte word, written
with a single store, so readers never see a torn value (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import mmap
import time

ENTRY = 64
# word offsets within an entry
PID, SLOT, GENERATION, CPU, STARTED, HEARTBEAT, REQUESTS, CONNECTIONS = range(8)
#: the master's counters, in the words of its own entry that no worker field uses
#: (written by the master only, read by the manager for /metrics)
M_RELOADS_OK, M_RELOADS_FAILED, M_LAST_RELOAD_FAILED = SLOT, CPU, STARTED
M_RECYCLES_RSS, M_RECYCLES_HEARTBEAT = REQUESTS, CONNECTIONS
MASTER_COUNTERS = {"reloads_ok": M_RELOADS_OK, "reloads_failed": M_RELOADS_FAILED,
                   "last_reload_failed": M_LAST_RELOAD_FAILED,
                   "recycles_rss": M_RECYCLES_RSS, "recycles_heartbeat": M_RECYCLES_HEARTBEAT}


class WorkerTable:
    def __init__(self, entries: int = 256):
        self.entries = entries
        self._map = mmap.mmap(-1, entries * ENTRY)
        self._q = memoryview(self._map).cast("q")
        self._d = memoryview(self._map).cast("d")

    def _w(self, index: int, word: int) -> int:
        return index * (ENTRY // 8) + word

    def assign(self, index: int, pid: int, slot: int, generation: int, cpu: int | None) -> None:
        q, d, w = self._q, self._d, self._w
        q[w(index, PID)] = 0
        q[w(index, SLOT)] = slot
        q[w(index, GENERATION)] = generation
        q[w(index, CPU)] = -1 if cpu is None else cpu
        d[w(index, STARTED)] = time.time()
        d[w(index, HEARTBEAT)] = 0.0
        q[w(index, REQUESTS)] = 0
        q[w(index, CONNECTIONS)] = 0
        q[w(index, PID)] = pid  # last: the entry is valid once the pid is set

    def set_master(self, pid: int, generation: int) -> None:
        """The master's own record lives in the last entry (not a worker slot)."""
        last = self.entries - 1
        self._q[self._w(last, GENERATION)] = generation
        self._q[self._w(last, PID)] = -pid  # negative: never listed as a worker

    def master(self) -> tuple[int, int]:
        """(master pid, current generation)."""
        last = self.entries - 1
        return -self._q[self._w(last, PID)], self._q[self._w(last, GENERATION)]

    def count_master(self, word: int, n: int = 1) -> None:
        """Master side: add ``n`` to one of its counters (M_RELOADS_OK, ...)."""
        self._q[self._w(self.entries - 1, word)] += n

    def count_reload(self, ok: bool) -> None:
        """Master side: a reload was applied (ok) or refused; remembers the last result."""
        self.count_master(M_RELOADS_OK if ok else M_RELOADS_FAILED)
        self._q[self._w(self.entries - 1, M_LAST_RELOAD_FAILED)] = 0 if ok else 1

    def master_counters(self) -> dict[str, int]:
        """The master's counters by name (see MASTER_COUNTERS)."""
        last = self.entries - 1
        return {name: self._q[self._w(last, word)] for name, word in MASTER_COUNTERS.items()}

    def clear(self, index: int) -> None:
        self._q[self._w(index, PID)] = 0

    def beat(self, index: int, requests: int, connections: int) -> None:
        """Worker side: heartbeat (monotonic clock, shared by all processes) + counters."""
        w = self._w
        self._q[w(index, REQUESTS)] = requests
        self._q[w(index, CONNECTIONS)] = connections
        self._d[w(index, HEARTBEAT)] = time.monotonic()

    def heartbeat(self, index: int) -> float:
        return self._d[self._w(index, HEARTBEAT)]

    def read(self, index: int) -> dict | None:
        q, d, w = self._q, self._d, self._w
        pid = q[w(index, PID)]
        if pid <= 0:
            return None
        cpu = q[w(index, CPU)]
        return {
            "pid": pid,
            "slot": q[w(index, SLOT)],
            "generation": q[w(index, GENERATION)],
            "cpu": None if cpu < 0 else cpu,
            "started": d[w(index, STARTED)],
            "heartbeat": d[w(index, HEARTBEAT)],
            "requests": q[w(index, REQUESTS)],
            "connections": q[w(index, CONNECTIONS)],
        }

    def live(self) -> list[tuple[int, dict]]:
        out = []
        for i in range(self.entries):
            e = self.read(i)
            if e is not None:
                out.append((i, e))
        return out
