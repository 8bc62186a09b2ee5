"""W3C Trace Context (https://www.w3.org/TR/trace-context/), sans-IO: parse and validate
``traceparent`` and ``tracestate``, format the ``traceparent`` sent upstream, make ids.

The worker calls these once per request, so they allocate little and make no system call:
ids come from :class:`IdGenerator` (random per worker, then a counter), not from
``os.urandom`` per request. The ratio sampler is a function of the trace id alone (the
OpenTelemetry TraceIdRatioBased rule on its low 8 bytes), so the worker (which sets the
sampled flag of a trace it starts) and the manager (which decides what it exports) agree
without talking.
"""

from __future__ import annotations

import os
import re
from binascii import hexlify, unhexlify

SAMPLED = 0x01
#: version-00 traceparent: version, trace-id, parent-id, flags (lower-case hex only)
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
#: a tracestate list member: key (simple or multi-tenant) "=" value (RFC text, 3.3.1)
_MEMBER_RE = re.compile(
    rb"[ \t]*(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e][ \t]*")
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_LENGTH = 512
_M64 = (1 << 64) - 1
#: an odd constant near 2**64 / golden ratio: successive ids differ in every byte
_STEP = 0x9E3779B97F4A7C15


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None:
    """(trace id 16 bytes, parent span id 8 bytes, flags) or None when invalid.

    Versions above 00 are read as 00 (the spec's forward compatibility: the four known
    fields, then "-" and more for a longer value); version ff is invalid.
    """
    value = value.strip(b" \t")
    m = _TRACEPARENT_RE.match(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags = m.groups()
    if version == b"ff" or trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == b"00" or value[55:56] != b"-"):
        return None
    return unhexlify(trace_hex), unhexlify(span_hex), int(flags, 16)


def format_traceparent(trace_id: bytes, span_id: bytes, flags: int) -> bytes:
    """The version-00 header value (we only send the version we know)."""
    return b"00-%s-%s-%02x" % (hexlify(trace_id), hexlify(span_id), flags & 0xFF)


def parse_tracestate(values: list[bytes]) -> str:
    """The combined ``tracestate`` header fields, or "" when invalid (then it is dropped,
    never the traceparent). Empty members are allowed and removed."""
    members = []
    for value in values:
        for member in value.split(b","):
            if not member.strip(b" \t"):
                continue
            if _MEMBER_RE.fullmatch(member) is None:
                return ""
            members.append(member.strip(b" \t"))
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return ""
    keys = {m.partition(b"=")[0] for m in members}
    if len(keys) != len(members):
        return ""  # a key appears twice
    text = b",".join(members)
    if len(text) > MAX_TRACESTATE_LENGTH:
        return ""
    return text.decode("ascii")


def ratio_threshold(ratio: float) -> int:
    """The TraceIdRatioBased threshold: ids whose low 8 bytes are below it are sampled."""
    if ratio >= 1.0:
        return 1 << 64
    return max(0, int(ratio * (1 << 64)))


def sampled_by_ratio(trace_id: bytes, threshold: int) -> bool:
    return int.from_bytes(trace_id[8:16], "big") < threshold


class IdGenerator:
    """Trace and span ids without a system call per id.

    A random 64-bit start per process (one ``os.urandom`` when made: a worker makes its
    own after fork), then a Weyl sequence (add an odd constant modulo 2**64): 2**64
    distinct values before one repeats, every byte changing from one id to the next. A
    trace id is a random per-process high half and the sequence as its low half (what
    ratio sampling reads).
    """

    __slots__ = ("_next", "high", "high_hex")

    def __init__(self) -> None:
        seed = os.urandom(16)
        self._next = int.from_bytes(seed[:8], "big")
        self.high = seed[8:] if any(seed[8:]) else b"\x00" * 7 + b"\x01"
        self.high_hex = hexlify(self.high)

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
        if low < threshold:
            return ((self.high + low.to_bytes(8, "big"), span.to_bytes(8, "big"), b"",
                     SAMPLED, ""),
                    b"traceparent: 00-%s%016x-%016x-01\r\n" % (self.high_hex, low, span))
        return ((self.high + low.to_bytes(8, "big"), span.to_bytes(8, "big"), b"", 0, ""),
                b"traceparent: 00-%s%016x-%016x-00\r\n" % (self.high_hex, low, span))
