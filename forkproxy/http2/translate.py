"""An HTTP/2 request's header list -> the project's HTTP/1.1 ``Request`` (RFC 9113 section 8,
RFC 9110), or a refusal that names why.

This is where downgrade smuggling is stopped: whatever an HTTP/2 client sends, the
``Request`` built here re-serialises (forkproxy's upstream head builder) into exactly one
HTTP/1.1 request whose framing forkproxy chose. So nothing that could carry framing or a
line break reaches it: connection-specific fields, ``te`` other than ``trailers``,
CR/LF/NUL (and the other controls HTTP/1.1 forbids) in names or values, uppercase names,
pseudo-header tricks, a ``host`` that disagrees with ``:authority``, a bad
``content-length``. libnghttp2 already checks most of this (its HTTP messaging rules are
on); this module checks it again, independently, because the cost of one miss is a
desynchronised upstream connection.

A refusal is a :class:`StreamRefused`: ``status`` 0 means "malformed" (the stream gets
RST_STREAM PROTOCOL_ERROR, RFC 9113 section 8.1.1); otherwise the proxy answers with that
status (431, 413, 417, 501), as it would over HTTP/1.1.
"""

from __future__ import annotations

import re

from forkproxy.http.messages import HOST_RE, connection_tokens
from forkproxy.http.request import GRPC_CONTENT_TYPE, Limits, Request, trace_field
from forkproxy.http.trailers import TrailersTooLarge, relayable_trailers

#: a request-target path forwarded upstream: the bytes llhttp's strict mode accepts in an
#: origin-form target (VCHAR without '#'); no SP, CTL or 8-bit byte
PATH_RE = re.compile(rb"^/[!-\"$-~]*\Z")
#: a field name: a lower-case token (RFC 9113 section 8.2.1: uppercase is malformed)
NAME_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
#: a field value forwarded over HTTP/1.1: no CTL but HTAB (RFC 9110 5.5; RFC 9113 section
#: 8.2.1 forbids NUL, CR and LF, HTTP/1.1 the rest) and no leading or trailing whitespace
VALUE_RE = re.compile(rb"^(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")
METHOD_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class StreamRefused(Exception):
    """The request is not forwarded; ``reason`` is the metrics label."""

    def __init__(self, reason: str, status: int = 0, detail: str = "", grpc: bytes = b""):
        super().__init__(detail or reason)
        self.reason = reason
        self.status = status
        #: the refused request's content-type when it is gRPC: the answer is then a
        #: gRPC status (forkproxy/http/grpcstatus.py), not an error page
        self.grpc = grpc


# what a field name means here; everything else is forwarded as it came
(_FORWARD, _CONN_SPECIFIC, _TE, _CL, _HOST, _COOKIE, _RID, _XFF, _EXPECT, _DROP, _UNDERSCORE,
 _TRACE, _CT) = range(13)
_SPECIAL = {
    b"connection": _CONN_SPECIFIC, b"keep-alive": _CONN_SPECIFIC,
    b"proxy-connection": _CONN_SPECIFIC, b"transfer-encoding": _CONN_SPECIFIC,
    b"upgrade": _CONN_SPECIFIC, b"te": _TE, b"content-length": _CL, b"host": _HOST,
    b"cookie": _COOKIE, b"x-request-id": _RID, b"x-forwarded-for": _XFF, b"expect": _EXPECT,
    b"trailer": _DROP,
    # forwarded as it came; marks a gRPC request (application/grpc...)
    b"content-type": _CT,
    # W3C trace context: the worker sends its own, with forkproxy's span as the parent
    b"traceparent": _TRACE, b"tracestate": _TRACE,
    # servers that map "_" to "-" would take these for framing forkproxy did not choose
    b"content_length": _UNDERSCORE, b"transfer_encoding": _UNDERSCORE,
}
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})


def _malformed(reason: str, detail: str) -> StreamRefused:
    return StreamRefused(reason, 0, detail)


def _pseudo(fields) -> tuple[dict, int]:
    """The leading pseudo-header fields (each once, known, requests only)."""
    first = 0
    for name, _ in fields:
        if name[:1] != b":":
            break
        first += 1
    pseudo = dict(fields[:first])
    if len(pseudo) != first or not pseudo.keys() <= _PSEUDO:  # (rare: find which)
        seen: set[bytes] = set()
        for name, _ in fields[:first]:
            if name not in _PSEUDO:
                raise _malformed("pseudo_header", f"unknown pseudo-header {name[:32]!r}")
            if name in seen:
                raise _malformed("pseudo_header", f"repeated {name.decode()}")
            seen.add(name)
    return pseudo, first


#: the last request header list translated, and what it gave (see build_request)
_last = [None, False, None, ()]


def build_request(fields: list[tuple[bytes, bytes]], end_stream: bool, limits: Limits) -> Request:
    """The validated Request for one request header list; raises StreamRefused.

    ``end_stream``: the HEADERS frame ended the stream (no body follows).

    A list equal to the last one translated (a client's requests for the same resource,
    gRPC calls of one method: HPACK sends them as the same fields) gives a new Request
    with the fields the last translation set (a list compare in C instead of ~400
    bytecodes of checks, which gave the same answer for the same list): the HTTP/1.1
    parser's fast-head memo does the same."""
    last = _last
    if fields == last[0] and end_stream is last[1] and limits is last[2]:
        req = Request()
        (req.method, req.target, req.path, headers, req.host, req.content_length, req.chunked,
         req.has_body, req.expect_continue, req.request_id, req.forwarded_for,
         req.header_bytes, req.traceparent, req.tracestate, req.grpc) = last[3]
        req.headers = headers.copy()
        return req
    req = _build(fields, end_stream, limits)
    last[0], last[1], last[2] = fields, end_stream, limits
    last[3] = (req.method, req.target, req.path, req.headers.copy(), req.host,
               req.content_length, req.chunked, req.has_body, req.expect_continue,
               req.request_id, req.forwarded_for, req.header_bytes, req.traceparent,
               req.tracestate, req.grpc)
    return req


def _build(fields, end_stream: bool, limits: Limits) -> Request:
    """build_request's translation proper."""
    pseudo, first = _pseudo(fields)
    req = Request()
    method = pseudo.get(b":method")
    if method is None or not METHOD_RE.match(method):
        raise _malformed("pseudo_header", "missing or invalid :method")
    req.method = method.decode("ascii")
    if req.method == "CONNECT":
        raise StreamRefused("connect", 501, "CONNECT not supported")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if scheme not in (b"http", b"https"):
        raise _malformed("pseudo_header", "missing or unsupported :scheme")
    if path is None:
        raise _malformed("pseudo_header", "missing :path")
    if not PATH_RE.match(path) and not (path == b"*" and req.method == "OPTIONS"):
        raise _malformed("pseudo_header", "invalid :path")
    if len(path) > limits.request_line:
        raise StreamRefused("uri_too_long", 414, "request target too long")
    authority = pseudo.get(b":authority")
    if authority is not None and not HOST_RE.match(authority):
        raise _malformed("pseudo_header", "invalid :authority")
    req.target = req.path = path
    _regular(req, fields, first, limits)
    if authority is not None:
        if req.host and req.host.lower() != authority.lower():
            raise _malformed("host_mismatch", "host differs from :authority")
        req.host = authority
    elif not req.host:
        raise _malformed("pseudo_header", "neither :authority nor host")
    _framing(req, end_stream, limits)
    return req


def _regular(req: Request, fields, first: int, limits: Limits) -> None:
    """The regular fields: checked, classified, forwarded or dropped."""
    headers = req.headers
    cookies: list[bytes] = []
    size = len(req.path)
    count = 0
    special = _SPECIAL
    for name, value in fields[first:] if first else fields:
        count += 1
        n = len(name) + len(value)
        size += n + 4
        if n > limits.header_size:
            raise StreamRefused("headers_too_large", 431, "header field too large")
        if not NAME_RE.match(name):
            if name.startswith(b":"):
                raise _malformed("pseudo_header", "pseudo-header after a regular field")
            if name.lower() != name:
                raise _malformed("uppercase", "uppercase field name")
            raise _malformed("bad_name", "invalid field name")
        if not VALUE_RE.match(value):
            raise _malformed("bad_value", "invalid character or whitespace in a value")
        what = special.get(name)
        if what is None:
            headers.append((name, value))
        elif what == _COOKIE:
            cookies.append(value)
        elif what == _HOST:
            if req.host:
                raise _malformed("host_mismatch", "more than one host")
            if not HOST_RE.match(value):
                raise _malformed("host_mismatch", "invalid host")
            req.host = value
        elif what == _CL:
            if not value.isdigit() or len(value) > 18:
                raise _malformed("content_length", "invalid content-length")
            cl = int(value)
            if req.content_length is not None and req.content_length != cl:
                raise _malformed("content_length", "conflicting content-length")
            req.content_length = cl
        elif what == _CONN_SPECIFIC:
            raise _malformed("connection_header", f"connection-specific field {name.decode()}")
        elif what == _TE:
            if value != b"trailers":
                raise _malformed("te", "te other than trailers")
        elif what == _RID:
            if not req.request_id:
                req.request_id = value
        elif what == _XFF:
            req.forwarded_for = req.forwarded_for + b", " + value if req.forwarded_for else value
        elif what == _EXPECT:
            if value.lower() != b"100-continue":
                raise StreamRefused("expectation", 417, "unsupported Expect")
            req.expect_continue = True
        elif what == _TRACE:
            trace_field(req, name == b"traceparent", value)
        elif what == _CT:
            headers.append((name, value))
            if value.startswith(GRPC_CONTENT_TYPE):
                req.grpc = value
        elif what == _UNDERSCORE:
            raise _malformed("content_length", "framing field spelled with '_'")
        # _DROP: hop-by-hop in HTTP/1.1, never forwarded
    if count > limits.header_count:
        raise StreamRefused("headers_too_large", 431, "too many header fields")
    if cookies:
        # RFC 9113 section 8.2.3: split crumbs are joined with "; " for HTTP/1.1
        headers.append((b"cookie", b"; ".join(cookies)))
        size += 2 * (len(cookies) - 1)
    if size > limits.headers_total:
        raise StreamRefused("headers_too_large", 431, "request header too large")
    req.header_bytes = size


def _framing(req: Request, end_stream: bool, limits: Limits) -> None:
    """How the body (if any) goes upstream: the length the client declared, which DATA
    must then match exactly (the session resets the stream otherwise), or chunked."""
    cl = req.content_length
    if end_stream:
        if cl:
            raise _malformed("content_length", "content-length without a body")
        req.has_body = False
        return
    limit = limits.body_size
    if cl is None:
        req.chunked = True
        req.has_body = True
    else:
        if limit and cl > limit:
            raise StreamRefused("body_too_large", 413, "request body too large", req.grpc)
        req.has_body = cl > 0


def request_trailers(fields) -> list[tuple[bytes, bytes]]:
    """A request's trailer section (HEADERS after DATA) checked as strictly as its head
    (they go upstream in the last chunk of a chunked body: a CR or LF there would split
    the upstream connection), then filtered (forkproxy.http.trailers); raises
    StreamRefused."""
    for name, value in fields:
        if not NAME_RE.match(name):
            raise _malformed("bad_name", "invalid trailer field name")
        if not VALUE_RE.match(value):
            raise _malformed("bad_value", "invalid character or whitespace in a trailer")
    try:
        return relayable_trailers(fields)
    except TrailersTooLarge as e:
        raise _malformed("headers_too_large", str(e))


#: response fields that are connection-specific in HTTP/2 (RFC 9113 section 8.2.2), and
#: content-length (set from the length the proxy relays)
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                            b"trailer", b"transfer-encoding", b"upgrade", b"content-length"})


def response_fields(fields, content_length: int | None) -> list[tuple[bytes, bytes]]:
    """An upstream HTTP/1.1 response's fields (already validated by the response parser)
    as an HTTP/2 header list: names lower-cased, connection-specific fields dropped,
    ``content-length`` the relayed length (None: not sent)."""
    out = [(name.lower(), value) for name, value in fields
           if name.lower() not in _RESPONSE_DROP]
    if content_length is not None:
        out.append((b"content-length", b"%d" % content_length))
    return out


#: request fields never sent to an HTTP/2 upstream: connection-specific (RFC 9113
#: section 8.2.2; te is sent as "trailers" below), and host (it is :authority)
_UPSTREAM_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                            b"transfer-encoding", b"upgrade", b"host", b"http2-settings",
                            b"content-length"})


def upstream_fields(req, rid: bytes, remote: bytes, scheme: bytes, host_fallback: bytes,
                    extra: bytes = b"", up_scheme: bytes = b"http") -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list sent to an HTTP/2 upstream for ``req``: the fields the
    HTTP/1.1 head (forkproxy/http/forward.py: upstream_head) carries, as HTTP/2 has them
    (names lower-case, the target in pseudo-headers, ``te: trailers`` for gRPC).
    ``scheme``: the client's, for X-Forwarded-Proto; ``up_scheme``: the connection's."""
    fields = [(b":method", req.method.encode()), (b":scheme", up_scheme),
              (b":authority", req.host or host_fallback), (b":path", req.path)]
    drop = _UPSTREAM_DROP
    if req.connection:
        drop = drop | connection_tokens(req.connection)
    for name, value in req.headers:
        lname = name.lower()
        if lname not in drop:
            fields.append((lname, value))
    fields.append((b"te", b"trailers"))
    fields.append((b"x-forwarded-for",
                   req.forwarded_for + b", " + remote if req.forwarded_for else remote))
    fields.append((b"x-forwarded-proto", scheme))
    fields.append((b"x-request-id", rid))
    if extra:  # whole HTTP/1.1 header lines (the trace context)
        for line in extra.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                fields.append((name.strip().lower(), value.strip()))
    if req.content_length is not None:
        fields.append((b"content-length", b"%d" % req.content_length))
    return fields
