"""Per-client-IP limits shared by every worker: a request rate (nginx's ``limit_req``)
and concurrent connections (nginx's ``limit_conn``), in one shared mapping that the
master creates before fork (:func:`forkproxy.shm.segment.create_mapping`: mode 0600,
unlinked at once, pages allocated on first touch).

Request rate: a fixed-size hash table of token buckets
----------------------------------------------------------

Each bucket is two aligned 8-byte words, ``key | tat``: the client's hash and its
*theoretical arrival time* in ``CLOCK_MONOTONIC`` nanoseconds (GCRA, the token bucket
written as one timestamp). A request at ``now`` is allowed when
``max(tat, now) + interval - now <= (burst + 1) * interval`` and then stores the new
``tat``; so a client gets ``burst + 1`` requests at once and then one per ``interval``,
exactly like ``limit_req rate=R burst=B nodelay``. Buckets come in pairs (2-way set
associative): a client uses the way holding its key, else evicts the way whose ``tat``
is older (an idle client's bucket is full anyway, so evicting it loses nothing).

The table is **lossy**, on purpose: no locks, no compare-and-swap (Python has none),
each word is a single 8-byte store (atomic at an aligned offset on x86-64; see
docs/ARCHITECTURE.md, "Measured facts").

* Two workers serving the same client at the same instant can both read the old
  ``tat`` and both store theirs: one request is not counted. The window is the
  microsecond between the load and the store. Measured (tests/test_limitzone.py): two
  processes offering 10x the rate admit it within 3%; the pathological case, both
  spinning on the bucket with nothing else to do, admitted 17% too many (at most one
  extra request per worker and interval).
* The clock is read after the bucket: a worker preempted between the two sees a later
  "now" than the ``tat`` it read (lenient), never an earlier one (reading it first made
  a worker descheduled for 7 ms refuse a client that was well within its rate).
* More than two active clients hashing to one pair evict each other's buckets; an
  evicted client starts with a full bucket again. With 65,536 pairs and 10,000 active
  clients, a given client shares its pair with at least two others about 0.1% of the
  time.
* The hash is Python's ``hash()`` of the address text, randomised per master start
  (workers inherit the seed through fork), so collisions cannot be aimed at offline.

Errors are always in the client's favour (a request too many is allowed, never one too
few), which is the right way round for a limiter that only defends against floods.

Concurrent connections: per-worker columns of counters
--------------------------------------------------------

A concurrent-connection count must not drift (a lost decrement would lock a client out
forever), so its counters are never written by two processes: every worker-table index
owns a column of ``slots`` u32 counters and only that worker writes it. A client's
count is the sum over the columns. Each client counts in two slots picked by different
bits of its hash, and the estimate is the smaller sum (a count-min sketch): it is never
below the truth, and above it only when both slots are shared with other busy clients.
The master clears a column (``MADV_REMOVE``: the pages go back to zero) when it reaps
the worker that owned it, before the index is used again.
"""

from __future__ import annotations

import mmap
import time

from forkproxy.config import parse_rate
from forkproxy.shm.segment import create_mapping

_MASK64 = (1 << 64) - 1
PAGE = mmap.PAGESIZE


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class LimitZone:
    """The shared tables. Create in the master (:meth:`create`), use in the workers."""

    def __init__(self, slots: int, columns: int, rate: bool, conns: bool):
        if slots < 1024 or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= 1024")
        self.slots = slots
        self.columns = columns
        self.rate_bytes = _round_up(slots * 16, PAGE) if rate else 0
        self.column_bytes = _round_up(slots * 4, PAGE)
        conn_bytes = self.column_bytes * columns if conns else 0
        self.size = self.rate_bytes + conn_bytes
        self._map = create_mapping("limits", max(self.size, PAGE))
        self._rq = memoryview(self._map)[: self.rate_bytes].cast("Q") if rate else None
        self._cq = memoryview(self._map)[self.rate_bytes : self.size].cast("I") if conns else None
        self._pair_mask = slots // 2 - 1
        self._slot_mask = slots - 1
        self._col_words = self.column_bytes // 4
        self._col_offs = tuple(range(0, self._col_words * columns, self._col_words))
        self._own = -1  # this worker's column offset (set by bind())

    @classmethod
    def create(cls, slots: int, columns: int, *, rate: bool, conns: bool) -> LimitZone | None:
        if not rate and not conns:
            return None
        return cls(slots, columns, rate, conns)

    @property
    def has_rate(self) -> bool:
        return self._rq is not None

    @property
    def has_conns(self) -> bool:
        return self._cq is not None

    def bind(self, index: int) -> None:
        """Worker side, after fork: count this process's connections in column ``index``."""
        if not 0 <= index < self.columns:
            raise ValueError(f"column {index} out of range")
        self._own = index * self._col_words

    def clear_column(self, index: int) -> None:
        """Master side: forget a reaped worker's connections (its column reads zero)."""
        if self._cq is None or not 0 <= index < self.columns:
            return
        start = self.rate_bytes + index * self.column_bytes
        try:
            self._map.madvise(mmap.MADV_REMOVE, start, self.column_bytes)
        except (OSError, AttributeError, ValueError):
            off = index * self._col_words
            cq = self._cq
            for i in range(self._col_words):
                if cq[off + i]:
                    cq[off + i] = 0

    # -- request rate ----------------------------------------------------------------

    def allow(self, key: str, interval: int, tolerance: int) -> bool:
        """One request from ``key``: True if within the rate. Times in nanoseconds;
        ``tolerance`` is ``(burst + 1) * interval``."""
        q = self._rq
        h = hash(key) & _MASK64 | 1
        i = (h >> 1 & self._pair_mask) << 2  # words: key0, tat0, key1, tat1
        if q[i] == h:
            j = i
        elif q[i + 2] == h:
            j = i + 2
        else:  # neither way is ours: take the one whose bucket refilled first
            j = i if q[i + 1] <= q[i + 3] else i + 2
            q[j + 1] = 0
            q[j] = h
        tat = q[j + 1]
        # the clock is read after the bucket: a process preempted between the two sees a
        # later "now" (more lenient), never an older one than the writer of that tat did
        now = time.monotonic_ns()
        if tat < now:
            tat = now
        tat += interval
        if tat - now > tolerance:
            return False
        q[j + 1] = tat
        return True

    # -- concurrent connections ------------------------------------------------------

    def _slots_of(self, key: str) -> tuple[int, int]:
        h = hash(key) & _MASK64
        a = h & self._slot_mask
        b = (h >> 32) & self._slot_mask
        if b == a:
            b = a ^ 1
        return a, b

    def count(self, key: str) -> int:
        """Connections of ``key`` over all workers (an estimate never below the truth)."""
        a, b = self._slots_of(key)
        cq = self._cq
        sa = sb = 0
        for off in self._col_offs:
            sa += cq[off + a]
            sb += cq[off + b]
        return sa if sa < sb else sb

    def open(self, key: str, limit: int) -> bool:
        """Count a new connection of ``key`` unless it already has ``limit``."""
        a, b = self._slots_of(key)
        cq = self._cq
        sa = sb = 0
        for off in self._col_offs:
            sa += cq[off + a]
            sb += cq[off + b]
        if (sa if sa < sb else sb) >= limit:
            return False
        own = self._own
        cq[own + a] += 1
        cq[own + b] += 1
        return True

    def close(self, key: str) -> None:
        """The connection counted by :meth:`open` ended."""
        a, b = self._slots_of(key)
        cq = self._cq
        own = self._own
        if cq[own + a]:
            cq[own + a] -= 1
        if cq[own + b]:
            cq[own + b] -= 1

    def release(self) -> None:
        """Unmap (the master at exit; workers just exit)."""
        rq, cq = self._rq, self._cq
        self._rq = self._cq = None
        for v in (rq, cq):
            if v is not None:
                v.release()
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass


class ClientLimits:
    """A worker's view: the configured limits over the shared zone."""

    __slots__ = ("zone", "interval", "tolerance", "per_ip", "status")

    def __init__(self, zone: LimitZone, cfg):
        self.zone = zone
        self.status = cfg.status
        self.per_ip = cfg.per_ip_connections if zone.has_conns else 0
        if cfg.rate and zone.has_rate:
            self.interval = int(1e9 / parse_rate(cfg.rate))
            self.tolerance = (cfg.burst + 1) * self.interval
        else:
            self.interval = 0
            self.tolerance = 0

    def allow_request(self, remote: str) -> bool:
        return not self.interval or self.zone.allow(remote, self.interval, self.tolerance)

    def open(self, remote: str) -> bool:
        return not self.per_ip or self.zone.open(remote, self.per_ip)

    def close(self, remote: str) -> None:
        if self.per_ip:
            self.zone.close(remote)
