"""The master's heap before fork (forkproxy/master/prefork.py): once its free blocks are
taken, new small objects come from fresh pools, carved in order, not from holes in the
pages the children share."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
import sys
import forkproxy.master.arbiter  # the master's imports: their holes
from forkproxy.master import prefork
gc.disable()  # no collection may free blocks between the probe's allocations
K = 8  # objects per size class
lengths = [size - prefork.BYTES_OVERHEAD for size in prefork.SIZE_CLASSES if size >= 48]
objs = [None] * (K * len(lengths))  # no allocation between the blocks of one class
taken = prefork.take_free_blocks() if sys.argv[1] == "take" else 0
for i, n in enumerate(lengths):
    for j in range(K):
        objs[K * i + j] = bytes(n)
adjacent = sum(id(objs[K * i + j + 1]) - id(objs[K * i + j]) == n + prefork.BYTES_OVERHEAD
               for i, n in enumerate(lengths) for j in range(K - 1))
print(taken, adjacent, (K - 1) * len(lengths))
"""


def _probe(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    taken, adjacent, pairs = (int(x) for x in out)
    return taken, adjacent, pairs


def test_after_taking_the_free_blocks_new_objects_are_packed_in_fresh_pools():
    """Eight objects per size class: taken first, nearly every one lies right after the
    one before (a pool boundary or a block freed since may break a pair or two); without
    taking them, the master's holes scatter about a third of them."""
    taken, adjacent, pairs = _probe("take")
    assert taken > 100  # the master's imports leave holes
    assert adjacent >= 0.95 * pairs, (adjacent, pairs)
    _, scattered, _ = _probe("keep")
    assert scattered < 0.9 * pairs, (scattered, pairs)  # the probe can tell the difference
