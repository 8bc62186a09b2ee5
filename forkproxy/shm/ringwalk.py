"""The consumer's walk over a ring's committed records (forkproxy/shm/ring.py), and the
layout constants it reads.

Split from ring.py so that the manager's side can be compiled (setup.py's COMPILED;
ringwalk.pxd types the positions, lengths and counters as C integers) while the worker's
``Ring.push`` stays as it is. Every access to the shared mapping still goes through the
``memoryview`` objects ``Ring`` hands in (``q``: the mapping cast to u64 words, ``buf``:
its bytes), one opaque call each, in the order ring.py's docstring gives ("Ordering"):
compiling changes the arithmetic between the loads, not the loads.
"""

from __future__ import annotations

HEADER_SIZE = 4096
WRAP = 0xFFFFFFFF
_M32 = 0xFFFFFFFF
_HI = _M32 << 32
_DATA = HEADER_SIZE

# Indexes of u64 words in the mapping (byte offset // 8).
_HEAD = 0
_TAIL = 64 // 8
_LOST = 72 // 8

#: the spans walk asks for the cache lines this many bytes ahead of the record it reads
#: (compiled only: ringwalk.pxd's fp_ring_prefetch). The records were written by other
#: CPUs and each header's place depends on the length before it, so without this every
#: record is a serial cache miss (~0.1 µs per record in scripts/replay-bench).
PREFETCH_BYTES = 2048
try:
    import cython

    _PREFETCH = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    _PREFETCH = False


def walk(q, buf, size, maxp, handler, decode, out, errors, max_records, starts=None,
         ends=None):
    """Up to ``max_records`` committed records, oldest first: ``handler(view)`` on each,
    or with ``decode``, ``out.append(decode(view))`` (Ring.drain, Ring.drain_decoded),
    or with ``starts``, where each record stands: record ``k`` is ``buf[starts[k]:
    ends[k]]`` (Ring.drain_spans; both have room for ``max_records``).

    ``size``: the data area's size (a power of two), ``maxp``: the longest payload.
    Publishes ``tail`` once, at the end (also when the handler raises), and returns
    (records consumed, records whose decode raised one of ``errors``); with ``starts``
    it publishes nothing and returns (records, the tail to publish once they are read).
    """
    mask = size - 1
    tail = q[_TAIL]
    head = q[_HEAD]
    spans = starts is not None
    if head == tail:
        return 0, tail if spans else 0
    if not (head > tail and head - tail <= size):  # corrupt: nothing below head is trustworthy
        q[_LOST] += 1
        if spans:
            return 0, head
        q[_TAIL] = head
        return 0, 0
    count = bad = 0
    data, m32, hi = _DATA, _M32, _HI  # C integers when compiled (ringwalk.pxd)
    append = out.append if out is not None else None
    prefetch = spans and _PREFETCH
    if prefetch:
        base = fp_ring_base(buf)  # noqa: F821 (ringwalk.pxd)
        pf = tail & ~63
        ahead = PREFETCH_BYTES
    try:
        while tail != head and count < max_records:
            if prefetch:
                while pf < head and pf < tail + ahead:
                    fp_ring_prefetch(base + data + (pf & mask))  # noqa: F821
                    pf += 64
            off = tail & mask
            word = q[(data + off) >> 3]
            n = word & m32
            if word & hi != (tail << 29) & hi:
                break  # not written in this lap: stale, or never committed
            if n > maxp:
                # A wrap marker is committed together with the record after it.
                if n != WRAP or off == 0 or tail + size - off >= head:
                    break
                tail += size - off
                continue
            need = (n + 15) & ~7
            if off + need > size or tail + need > head:
                break
            at = data + off + 8
            tail += need
            count += 1
            if spans:
                starts[count - 1] = at
                ends[count - 1] = at + n
                continue
            if append is not None:
                try:
                    append(decode(buf[at : at + n]))
                except errors:
                    bad += 1
                continue
            view = buf[at : at + n]
            try:
                handler(view)
            finally:
                view.release()
        else:
            return count, tail if spans else bad
        q[_LOST] += 1  # a break: skip everything committed so far and resynchronise
        tail = head
    finally:
        if not spans:
            q[_TAIL] = tail
    return count, tail if spans else bad
