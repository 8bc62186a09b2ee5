"""The worker's heap: the garbage collector's set-up after start-up, and giving freed
heap memory back to the OS after many connections closed."""

from __future__ import annotations

import gc

from forkproxy import libcalls

#: gc.collect() + malloc_trim(0) once the connection count fell by TRIM_MIN_DROP and to half of
#: its high-water mark, checked at most every TRIM_INTERVAL seconds (see HeapTrimmer)
TRIM_INTERVAL = 5.0
TRIM_MIN_DROP = 500


#: the collector's young-generation threshold in a worker (CPython's default is 700)
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once the worker is set up: what it built lives as long as it does, so it is
    frozen out of the collector's generations (fewer objects scanned per collection),
    and the young generation's threshold is raised.

    The threshold counts container allocations less deallocations, and requests in
    flight keep theirs alive: with 320 gRPC calls in flight a young collection came every
    ~25 calls and found 7,000-10,000 live objects (field tuples, lists, requests, heads),
    all promoted, so the older generations were walked often too: ~11 µs of CPU per call
    (docs/BENCHMARKS.md, gRPC). At 10,000 the walk comes 100 times less often. Cycles of
    garbage wait longer for it (a few MB at most); the heap trimmer still collects."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class HeapTrimmer:
    """Hands freed heap memory back to the OS after many connections are gone.

    Closed connections leave garbage cycles (a request parser and its callbacks) that
    only a full collection frees, and glibc's malloc keeps freed memory unless asked:
    ``gc.collect()`` then ``malloc_trim(0)`` (which releases the free pages of every
    malloc arena). Together they take a few ms to a few tens of ms, so the sweeper calls
    :meth:`check` and they run only when the count fell well below its high-water mark,
    at most once every TRIM_INTERVAL seconds; never on a request's path. What pymalloc
    holds in partly used arenas stays resident (CPython does not give free pools back).
    Without glibc's malloc_trim, nothing is done.
    """

    __slots__ = ("peak", "next_check", "trims", "_trim")

    def __init__(self):
        self.peak = 0
        self.next_check = 0.0
        self.trims = 0
        self._trim = libcalls.malloc_trim if libcalls.has_malloc_trim() else None

    def check(self, connections: int, now: float) -> bool:
        """Track the high-water mark; trim if due. True if it trimmed."""
        if connections > self.peak:
            self.peak = connections
        if now < self.next_check or self._trim is None:
            return False
        self.next_check = now + TRIM_INTERVAL
        if self.peak - connections < TRIM_MIN_DROP or connections > self.peak // 2:
            return False
        gc.collect()
        self._trim()
        self.peak = connections
        self.trims += 1
        return True
