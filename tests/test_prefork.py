"""The master's heap before fork (forkproxy/master/prefork.py): once its free blocks are
taken, new small objects come from fresh pools, carved in order, not from holes in the
pages the children share."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import forkproxy.master.arbiter  # the master's imports: their holes
from forkproxy.master import prefork
lengths = [size - prefork.BYTES_OVERHEAD for size in prefork.SIZE_CLASSES if size >= 48]
objs = [None] * (3 * len(lengths))  # no allocation between the blocks of one class
taken = prefork.take_free_blocks()
for i, n in enumerate(lengths):  # the first may take a block freed since (an iterator)
    objs[3 * i] = bytes(n)
    objs[3 * i + 1] = bytes(n)
    objs[3 * i + 2] = bytes(n)
fresh = sum(id(objs[3 * i + 2]) - id(objs[3 * i + 1]) == n + prefork.BYTES_OVERHEAD
            for i, n in enumerate(lengths))
print(taken, fresh, len(lengths))
"""


def test_after_taking_the_free_blocks_new_objects_are_packed_in_fresh_pools():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    taken, fresh, classes = (int(x) for x in out)
    assert taken > 100  # the master's imports leave holes
    assert fresh == classes  # every size class now allocates block after block
