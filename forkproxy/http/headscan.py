"""The HTTP/1.1 heads the fast paths take, scanned once (compiled: setup.py's COMPILED,
headscan.pxd): the upstream's response head judged, a client's GET/HEAD head split into
its parts.

As plain Python each is a regex fullmatch and then more passes over the bytes (a
lower-cased copy searched for hop-by-hop fields, Content-Length and Connection found in
it; a request block split into lines, each partitioned, stripped and its name
lower-cased): ~2.8 µs for an nginx response head, ~4.9 µs for a browser's request head
of ten fields. Compiled, one C loop walks the bytes, checks every byte against the same
grammar and builds the same result: ~0.17 and ~0.9 µs (scripts/headscan-ab). Real
traffic pays this on every request: its heads do not repeat, so the one-entry memos in
front (response.fast_head, request._last_request) do not hit.

The same results for every input either way (tests/test_headscan.py runs the C against
this file as Python on random heads near the grammar's edges).
"""

from __future__ import annotations

import re

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False

_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: a whole response head the fast path may take: HTTP/1.x, a 1xx-5xx status, a reason
#: and field values of HTAB/SP/VCHAR/obs-text only, every field name a token directly
#: followed by ':'. Whatever llhttp's strict mode refuses (obs-fold, bare CR or LF, CTLs,
#: whitespace before the colon) does not match, and goes the httptools way to be judged.
_SIMPLE_HEAD_RE = re.compile(
    rb"HTTP/1\.[01] [1-5][0-9][0-9] " + _VALUE
    + rb"\r\n(?:" + _TCHARS + rb":" + _VALUE + rb"\r\n)*\r\n")
#: hop-by-hop fields the fast path leaves to the full parser (lower-cased head)
_HOP_RE = re.compile(rb"\r\n(?:keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
                     rb"|proxy-authenticate|proxy-authorization):")
_CL = b"\r\ncontent-length:"
_CONN = b"\r\nconnection:"

#: a whole request head the request fast path may take: GET or HEAD, an origin-form
#: target of URI characters only, HTTP/1.x, field names that are tokens directly followed
#: by ':' and values of HTAB/SP/VCHAR/obs-text. Whatever does not match goes through
#: llhttp, which judges it as before.
_SIMPLE_REQUEST_RE = re.compile(
    rb"(GET|HEAD) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.([01])\r\n"
    rb"((?:" + _TCHARS + rb":" + _VALUE + rb"\r\n)*)\r\n")


def judge_response_head(head: bytes) -> tuple[int, int, bool, bytes] | None:
    """The common upstream answer without httptools: a final (non-1xx) response framed
    by one Content-Length, no hop-by-hop field but one ``Connection: keep-alive|close``
    (a Connection naming any other field is declined: the parser removes named fields).

    Returns (status, content_length, upstream_keep_alive, head) where head is the
    response head to relay, the upstream's own bytes as HTTP/1.1 minus its Connection
    line. None: anything else, which the full parser then parses and judges."""
    if COMPILED and type(head) is bytes:
        return fp_judge_response_head(head)  # noqa: F821
    if _SIMPLE_HEAD_RE.fullmatch(head) is None or head[9] == 49:  # b"1": interim / 101
        return None
    low = head.lower()
    if _HOP_RE.search(low) is not None:
        return None
    i = low.find(_CL)
    if i < 0 or low.find(_CL, i + 17) >= 0:
        return None
    value = head[i + 17 : low.index(b"\r\n", i + 17)].lstrip(b" \t")
    if not value.isdigit() or len(value) > 18 or (value[0] == 48 and len(value) > 1):
        return None  # leading zeros: the full parser re-frames it as a plain number
    keep = head[7] == 49  # HTTP/1.1: persistent unless "Connection: close"
    i = low.find(_CONN)
    if i >= 0:
        end = low.index(b"\r\n", i + 13)
        token = low[i + 13 : end].strip(b" \t")
        if token == b"close":
            keep = False
        elif token == b"keep-alive":
            keep = True
        else:
            return None
        if low.find(_CONN, end) >= 0:
            return None
        head = head[:i] + head[end:]
    if head[7] == 48:  # HTTP/1.0 upstream: relayed as HTTP/1.1
        head = b"HTTP/1.1" + head[8:]
    return int(head[9:12]), int(value), keep, head


#: the request fields the fast path acts on (lower case: request.py's fields but
#: Content-Type); scan_request_head hands them over apart from the fields forwarded as
#: they came
REQUEST_SPECIAL = frozenset({
    b"content-length", b"transfer-encoding", b"host", b"connection", b"x-request-id",
    b"x-forwarded-for", b"expect", b"upgrade", b"traceparent", b"tracestate",
    b"keep-alive", b"proxy-connection", b"te", b"trailer", b"content_length",
    b"transfer_encoding",
})


def scan_request_head(head: bytes) -> tuple[bool, bytes, bool, list, list, int] | None:
    """A whole GET/HEAD request head split into (is_get, target, minor_is_0, fields,
    specials, header_bytes): ``fields`` the ``(name, value)`` pairs to forward as sent,
    ``specials`` those of REQUEST_SPECIAL as ``(lower-cased name, value)``, in order (a
    value without the blanks after its colon), and ``header_bytes`` what the size limits
    count (the target, and name + value + 4 per field). None: not the simple shape,
    llhttp's to judge."""
    if COMPILED and type(head) is bytes:
        return fp_scan_request_head(head)  # noqa: F821
    m = _SIMPLE_REQUEST_RE.fullmatch(head)
    if m is None:
        return None
    method, target, minor, block = m.groups()
    fields = []
    specials = []
    header_bytes = len(target)
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        value = value.lstrip(b" \t")
        header_bytes += len(name) + len(value) + 4
        low = name.lower()
        if low in REQUEST_SPECIAL:
            specials.append((low, value))
        else:
            fields.append((name, value))
    return method == b"GET", target, minor == b"0", fields, specials, header_bytes
