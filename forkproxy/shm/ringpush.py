# cython: boundscheck=False, wraparound=False
"""The ring's producer side in C (compiled only): the worker's push of one record per
request.

``Ring.push`` in plain Python is ~40 bytecodes, a slice assignment into the mapping and
four 8-byte accesses through ``memoryview.cast('Q')``, ~450 ns per record; this is the
same push in one C call (ringpush.pxd's ``fp_ring_push``), with its stores into the
shared mapping made as C11 atomics in ring.py's order (payload, header, then ``head``).
A :class:`~forkproxy.shm.ring.Ring` uses it when this module is compiled (setup.py's
COMPILED); as plain Python (FORKPROXY_PURE_PYTHON=1, no compiler) ``COMPILED`` is False
and the Ring pushes in Python, the same bytes (tests/test_ring.py compares the two).
"""

from __future__ import annotations

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False


class Producer:
    """The producer's state of one ring: the mapping's address, its sizes, the doorbell,
    and the cached limit (the consumer's ``tail`` + size, re-read only when a push seems
    not to fit)."""

    def __init__(self, mapping, doorbell_fd: int, size: int, tail: int):
        self._mapping = mapping
        self._view = mapping  # a buffer export: pins the mapping while this lives
        self._base = cython.address(self._view[0])
        self._size = size
        self._half = size // 2
        self._limit = tail + size
        self._efd = doorbell_fd

    def push(self, payload) -> bool:
        """Append one record (any object with the buffer protocol): False if dropped."""
        if self._base == cython.NULL:
            raise ValueError("push into a closed ring")
        PyObject_GetBuffer(payload, cython.address(buf), PyBUF_SIMPLE)  # noqa: F821
        try:
            p = cython.cast("const char *", buf.buf)  # noqa: F821
            n = buf.len  # noqa: F821
            ok = fp_ring_push(self._base, p, n, self._size, self._half,  # noqa: F821
                              cython.address(self._limit), self._efd)
        finally:
            PyBuffer_Release(cython.address(buf))  # noqa: F821
        return ok != 0

    def close(self) -> None:
        """Release the mapping (Ring.close: it can be unmapped only without exports)."""
        self._view = None
        self._mapping = None
        self._base = cython.NULL

    def reset(self) -> None:
        """Re-read the consumer's tail (Ring.reset_producer)."""
        self._limit = cython.cast("unsigned long long *", self._base)[8] + self._size
