"""Worker pieces that need no process around them."""

from __future__ import annotations

import subprocess
import sys

from forkproxy.worker.heap import GC_YOUNG_THRESHOLD, TRIM_INTERVAL, HeapTrimmer


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


def test_settle_heap_freezes_and_raises_the_young_threshold():
    """In a fresh interpreter (the test process's collector is left alone)."""
    code = ("import gc\nfrom forkproxy.worker.heap import settle_heap\n"
            "before = gc.get_threshold()\nsettle_heap()\n"
            "print(gc.get_freeze_count() > 0, before[1:] == gc.get_threshold()[1:],"
            " gc.get_threshold()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True", str(GC_YOUNG_THRESHOLD)]
