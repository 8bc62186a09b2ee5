"""W3C Trace Context (https://www.w3.org/TR/trace-context/), sans-IO: parse and validate
``traceparent`` and ``tracestate``, format the ``traceparent`` sent upstream, make ids.

The worker calls these once per request, so they allocate little and make no system call:
ids come from :class:`~forkproxy.http.ids.IdGenerator` (random per worker, then a
counter; compiled), not from ``os.urandom`` per request. The ratio sampler is a function
of the trace id alone (the OpenTelemetry TraceIdRatioBased rule on its low 8 bytes), so
the worker (which sets the sampled flag of a trace it starts) and the manager (which
decides what it exports) agree without talking.
"""

from __future__ import annotations

import re
from binascii import hexlify, unhexlify

from forkproxy.http.ids import SAMPLED, IdGenerator  # noqa: F401 (re-exported)

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
