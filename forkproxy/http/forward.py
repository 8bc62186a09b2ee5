"""Sans-IO heads the proxy writes: the request head it sends upstream, the response head
it rebuilds for an HTTP/1.1 client, interim (1xx) heads, and the 101 head of a tunnel.

Kept apart from the sockets so the fuzz target and the unit tests check them by parsing
what they produce (scripts/fuzz re-parses every forwarded head).
"""

from __future__ import annotations

from forkproxy.http.framing import Framing
from forkproxy.http.headbuild import request_head
from forkproxy.http.messages import connection_tokens

#: the connection options a client may name that are not header fields to strip
_OPTIONS = frozenset({b"close", b"keep-alive"})

#: response headers never copied into a client's 101 (Connection/Upgrade are rebuilt)
_DROP_FROM_101 = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                            b"trailer", b"transfer-encoding", b"upgrade", b"content-length"})


def upstream_head(req, rid: bytes, remote: bytes, scheme: bytes, host_fallback: bytes,
                  extra: bytes = b"") -> bytes:
    """The HTTP/1.1 request head sent upstream for ``req`` (hot path).

    Hop-by-hop fields were dropped by the parser; the fields the client's Connection
    header names are dropped here. X-Forwarded-For is appended to, X-Forwarded-Proto and
    X-Request-Id are set, ``extra`` (whole header lines: the trace context) is added,
    and the body is framed as parsed (chunked stays chunked). Written by
    headbuild.request_head (in C when compiled)."""
    headers = req.headers
    if req.connection:
        drop = connection_tokens(req.connection) - _OPTIONS
        if drop:
            headers = [h for h in headers if h[0].lower() not in drop]
    if req.chunked:
        tail = b"Transfer-Encoding: chunked\r\n\r\n"
    elif req.content_length is not None:
        tail = b"Content-Length: %d\r\n\r\n" % req.content_length
    else:
        tail = b"\r\n"
    return request_head(req.method, req.path, req.host or host_fallback, headers,
                        req.forwarded_for, remote, scheme, rid, extra, tail)


def upgrade_head(head: bytes, upgrade: bytes, leftover: bytes) -> bytes:
    """A tunnel's request head: Connection/Upgrade kept (stripped from any other
    request), followed by the bytes the client sent after its head."""
    return head[:-2] + b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n" + leftover


def rebuilt_response_head(rhead, framing: Framing, client_11: bool, keep: bool) -> bytes:
    """The client's HTTP/1.1 response head from a parsed upstream head (the heads the
    fast path does not take): re-framed for the client, Connection set by ``keep``."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (rhead.status, rhead.reason)]
    for name, value in rhead.headers:
        parts += (name, b": ", value, b"\r\n")
    if framing is Framing.LENGTH or (framing is Framing.NONE
                                     and rhead.content_length is not None):
        parts.append(b"Content-Length: %d\r\n" % rhead.content_length)
    elif framing is not Framing.NONE and client_11:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if not keep:
        parts.append(b"Connection: close\r\n\r\n")
    elif not client_11:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


#: reason phrases of the interim statuses (RFC 9110 section 15.2, RFC 8297); others: none
_INTERIM_REASONS = {100: b"Continue", 102: b"Processing", 103: b"Early Hints"}


def interim_head(status: int, fields) -> bytes:
    """An interim (1xx) response head for an HTTP/1.1 client, from the upstream's parsed
    one (fields validated and hop-by-hop fields removed by the response parser)."""
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (
        status, _INTERIM_REASONS.get(status, b""), b"".join([b"%s: %s\r\n" % f for f in fields]))


def trailers_only_head(fields, close: bool) -> bytes:
    """A 200 without a body whose ``fields`` carry everything (gRPC's trailers-only
    response, as the proxy answers its own failures on a gRPC request over HTTP/1.1)."""
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: 0\r\n%s\r\n" % (
        b"".join([b"%s: %s\r\n" % f for f in fields]),
        b"Connection: close\r\n" if close else b"")


def switching_protocols_head(raw: bytes) -> bytes:
    """The 101 head for the client: the upstream's end-to-end headers, Connection and
    Upgrade rebuilt (the upstream's Upgrade value: the protocol it switched to). Fields
    its Connection names are hop-by-hop (RFC 9110 section 7.6.1) and dropped too."""
    out = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    proto = b""
    fields = [(name.strip().lower(), name, value) for name, sep, value
              in (line.partition(b":") for line in raw.split(b"\r\n")[1:]) if sep]
    named = connection_tokens([v for lname, _, v in fields if lname == b"connection"])
    for lname, name, value in fields:
        if lname == b"upgrade":
            proto = value.strip()
        elif lname not in _DROP_FROM_101 and lname not in named:
            out += (name, b":", value, b"\r\n")
    out += (b"Connection: Upgrade\r\n", b"Upgrade: ", proto or b"websocket", b"\r\n\r\n")
    return b"".join(out)


def response_fields(raw_head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a head the fast path took (already validated, Connection removed),
    for front ends that do not relay HTTP/1.1 bytes (HTTP/2 builds a header list)."""
    fields = []
    for line in raw_head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name, value.strip(b" \t")))
    return fields
