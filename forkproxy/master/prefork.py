"""The master's small-object heap just before it forks: its free blocks taken.

CPython's allocator (pymalloc) serves a small object from the first pool of its size
class that has a free block. After start-up the master's pools are full of holes left by
temporary objects, scattered over pages that hold the shared modules' objects. A child's
first allocations would fill those holes, and each one copies a whole shared 4 KiB page
for one object. Taking every free block in the master first (the blocks stay resident,
they were already) makes the children allocate from fresh pools: their new objects are
packed into pages of their own, and the shared pages stay shared.
"""

from __future__ import annotations

#: pymalloc's pool size and the offset of a pool's first block (its header, aligned)
POOL_SIZE = 16384
POOL_FIRST_BLOCK = 48
#: size classes of 16 bytes up to the small-object threshold (512)
SIZE_CLASSES = range(16, 513, 16)
#: at most this many blocks taken per size class
MAX_PER_CLASS = 20000
#: what a bytes object of length 0 takes (its header and the trailing NUL)
BYTES_OVERHEAD = 33

_plugs: list = []


def _block(size: int, n: int):
    """A new object of pymalloc size class ``size`` (``n`` makes each one distinct)."""
    if size == 16:
        return object()
    if size == 32:
        return float(n)  # 24 bytes, in the 32-byte class
    return bytes(size - BYTES_OVERHEAD)


def take_free_blocks() -> int:
    """Allocate objects until every size class draws from a fresh pool; returns how many
    blocks were taken. The objects are kept for the master's life.

    Two passes. The first takes blocks until a fresh pool shows (its first block, then
    the one after it). The second takes what the first pass's own work freed again, and
    the holes the first could not see (a pool whose first two blocks were free, as a list
    freed in reverse leaves them), until two blocks in a row are adjacent. No range or
    other object of a probed size is made inside the loops (a freed one is a new hole)."""
    taken = 0
    for size in SIZE_CLASSES:
        taken += _take(size, True)
    for size in SIZE_CLASSES:
        taken += _take(size, False)
    return taken


def _take(size: int, fresh_pool: bool) -> int:
    """Blocks of class ``size`` until two in a row are adjacent (``fresh_pool``: and the
    first of them is a pool's first block); returns how many."""
    n = 0
    prev = 0
    while n < MAX_PER_CLASS:
        obj = _block(size, n)
        addr = id(obj)
        _plugs.append(obj)
        n += 1
        # a fresh pool is carved in order: its first block, then the one after it
        if addr == prev + size and (not fresh_pool or prev % POOL_SIZE == POOL_FIRST_BLOCK):
            break
        prev = addr
    return n
