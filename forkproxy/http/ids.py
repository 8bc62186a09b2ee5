"""The ids a request gets in the worker, one call each (compiled: setup.py's COMPILED,
ids.pxd): its X-Request-Id, and forkproxy's span with the ``traceparent`` line sent
upstream (forkproxy/http/tracecontext.py has the rest of W3C Trace Context).

As plain Python ``new_trace`` is two additions, two ``to_bytes`` and a bytes format with
two ``%016x`` (~450 ns), and a request id a ``%08x`` format (~150 ns); compiled, the ids
and the line are written by ids.pxd's helpers into bytes objects (~100 and ~40 ns). The
same bytes either way (tests/test_tracing.py).
"""

from __future__ import annotations

import os
from binascii import hexlify

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False

SAMPLED = 0x01
_M64 = 0xFFFFFFFFFFFFFFFF
#: an odd constant near 2**64 / golden ratio: successive ids differ in every byte
_STEP = 0x9E3779B97F4A7C15


class RequestIds:
    """X-Request-Id values: a random 32-bit prefix per worker (one ``os.urandom`` when
    made, after fork), then a counter, both in lower-case hex (at least 8 digits each)."""

    def __init__(self) -> None:
        self.prefix = b"%08x" % int.from_bytes(os.urandom(4), "big")
        self.count = 0

    def next(self) -> bytes:
        count = self.count = self.count + 1
        if COMPILED:
            return fp_request_id(self.prefix, count)  # noqa: F821
        return b"%s%08x" % (self.prefix, count)


class IdGenerator:
    """Trace and span ids without a system call per id.

    A random 64-bit start per process (one ``os.urandom`` when made: a worker makes its
    own after fork), then a Weyl sequence (add an odd constant modulo 2**64): 2**64
    distinct values before one repeats, every byte changing from one id to the next. A
    trace id is a random per-process high half and the sequence as its low half (what
    ratio sampling reads).
    """

    def __init__(self) -> None:
        seed = os.urandom(16)
        self._next = int.from_bytes(seed[:8], "big")
        self.high = seed[8:] if any(seed[8:]) else b"\x00" * 7 + b"\x01"
        self.high_hex = hexlify(self.high)
        # the last threshold new_trace was given, as C values: it is the worker's one
        # setting, so comparing C integers needs no int object per request
        self._threshold = None
        self._sample_all = False
        self._below = 0

    def next(self) -> int:
        """The next 64-bit value of the sequence (never 0)."""
        n = self._next = (self._next + _STEP) & _M64
        return n or _STEP

    def span_id(self) -> bytes:
        return self.next().to_bytes(8, "big")

    def trace_id(self) -> bytes:
        return self.high + self.next().to_bytes(8, "big")

    def new_trace(self, threshold: int) -> tuple[tuple, bytes]:
        """A new trace and its first span, sampled by ratio: ((trace id, span id, b"" for
        no parent, flags, "" for no tracestate), the traceparent header line). The
        worker's hot path: two additions, one format (the sequence inlined)."""
        low = (self._next + _STEP) & _M64
        span = self._next = (low + _STEP) & _M64
        if not (low and span):  # once in 2**64 ids
            return self.new_trace(threshold)
        if COMPILED:  # the ids and the line written in C (ids.pxd)
            if threshold is not self._threshold:
                self._threshold = threshold
                self._sample_all = threshold > _M64
                self._below = 0 if self._sample_all else threshold
            sampled = self._sample_all or low < self._below
            return ((fp_trace_id(self.high, low), fp_id8(span), b"",  # noqa: F821
                     SAMPLED if sampled else 0, ""),
                    fp_traceparent_line(self.high_hex, low, span, sampled))  # noqa: F821
        if low < threshold:
            return ((self.high + low.to_bytes(8, "big"), span.to_bytes(8, "big"), b"",
                     SAMPLED, ""),
                    b"traceparent: 00-%s%016x-%016x-01\r\n" % (self.high_hex, low, span))
        return ((self.high + low.to_bytes(8, "big"), span.to_bytes(8, "big"), b"", 0, ""),
                b"traceparent: 00-%s%016x-%016x-00\r\n" % (self.high_hex, low, span))
