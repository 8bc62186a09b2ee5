"""Worker pieces that need no process around them."""

from __future__ import annotations

from forkproxy.worker.heap import TRIM_INTERVAL, HeapTrimmer


def test_heap_trimmer_trims_only_well_below_the_peak_and_not_too_often():
    t = HeapTrimmer()
    assert t._trim is not None  # glibc: malloc_trim exists
    assert not t.check(0, 100.0)  # nothing was ever used
    assert not t.check(5000, 101.0)  # the high-water mark grows between checks
    now = 100.0 + TRIM_INTERVAL
    assert not t.check(3000, now)  # 2,000 fewer, but more than half of the peak left
    assert not t.check(2000, now + 1.0)  # well below now, but checked a second ago
    assert t.check(2000, now + TRIM_INTERVAL)  # due: gc.collect() + malloc_trim(0)
    assert (t.trims, t.peak) == (1, 2000)  # the new high-water mark is what is left
    now += 2 * TRIM_INTERVAL
    assert not t.check(1700, now)  # 300 fewer: too few to be worth a trim
    assert t.check(0, now + TRIM_INTERVAL)
    assert t.trims == 2
