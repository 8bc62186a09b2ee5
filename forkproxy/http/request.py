"""Sans-IO request parsing: bytes in, events out, strict framing.

httptools (llhttp, strict mode: no lenient flags) does the tokenising; this layer adds
what a proxy must enforce on top (RFC 9112 framing rules, smuggling defences, size
limits) and turns the callbacks into a queue of events so the connection loop can serve
pipelined requests in order: ``(HEAD, Request)``, ``(BODY, bytes)``, ``(END, None)`` and,
last, ``(ERROR, HTTPError)`` when the bytes stop making sense. At most one recv buffer of
events is ever queued, because the loop only feeds more bytes when the queue is empty.

An error never overtakes the complete requests before it: feed() drops only the events
of the broken message and queues the error after the requests that parsed, so a good
request pipelined before a bad one is still served, and nothing after the bad one is.

What is rejected, and by whom (tests/test_smuggling.py has a case for each):

* llhttp: obs-fold, bare CR/LF in the request line, headers and chunked framing,
  whitespace before a colon, CTL/NUL/8-bit bytes in the target, CTL/NUL in values,
  invalid methods and versions, CL together with TE, duplicate Content-Length, invalid
  chunk sizes (non-hex, signs, spaces, over 2**64), malformed chunk extensions, a
  Transfer-Encoding whose last coding is not ``chunked``.
* here: any Transfer-Encoding other than exactly ``chunked`` (400; ``gzip, chunked`` is
  501 like nginx), TE in HTTP/1.0, conflicting Content-Length, invalid header names or
  values, multiple or malformed Host, an absolute-form target whose authority differs
  from Host, ``#`` in the target, versions other than 1.0/1.1, size limits (414, 431,
  413 including chunked bodies crossing the limit mid-stream), trailer sections and
  chunk-extension bytes beyond a budget, ``Content_Length``/``Transfer_Encoding``.
  Trailers are validated and dropped.
"""

from __future__ import annotations

from collections import deque

import httptools

from forkproxy.http.headscan import scan_request_head
from forkproxy.http.messages import BAD_VALUE_RE, HOST_RE, TOKEN_RE, HTTPError

HEAD, BODY, END, ERROR = 1, 2, 3, 4

#: chunked framing bytes (size lines, extensions, CRLFs, trailers) allowed beyond the
#: body itself: a fixed allowance plus this much per chunk. Legitimate clients use
#: about 6 bytes per chunk; the budget stops a body made only of extensions or an
#: endless trailer section (both invisible to the body-size limit).
CHUNK_OVERHEAD_BASE = 16384
CHUNK_OVERHEAD_PER_CHUNK = 256
#: the header fields the parser acts on (lower case); every other field is forwarded as
#: it came. One dict lookup per field instead of a chain of comparisons.
(_CL, _TE, _HOST, _CONN, _RID, _XFF, _EXPECT, _DROP, _UPGRADE, _UNDERSCORE, _CT, _TP,
 _TS) = range(13)
_SPECIAL = {
    b"content-length": _CL, b"transfer-encoding": _TE, b"host": _HOST, b"connection": _CONN,
    b"x-request-id": _RID, b"x-forwarded-for": _XFF, b"expect": _EXPECT, b"upgrade": _UPGRADE,
    # forwarded as it came; marks a gRPC request (application/grpc...)
    b"content-type": _CT,
    # W3C trace context: re-emitted by the upstream head builder with forkproxy's span
    b"traceparent": _TP, b"tracestate": _TS,
    b"keep-alive": _DROP, b"proxy-connection": _DROP, b"te": _DROP, b"trailer": _DROP,
    # servers that map "_" to "-" (CGI style) would take these for framing we did not see
    b"content_length": _UNDERSCORE, b"transfer_encoding": _UNDERSCORE,
}

#: fields the fast path handles itself; any other special field sends the head to llhttp
_FAST_SPECIAL = frozenset({_HOST, _CONN, _RID, _XFF, _TP, _TS})
#: the fields the fast path acts on: content-type is forwarded as any other field there
#: (a GET or HEAD is never a gRPC call); headscan.REQUEST_SPECIAL has the same names
_FAST_FIELDS = {name: what for name, what in _SPECIAL.items() if what != _CT}
#: what a gRPC request's content-type starts with (gRPC over HTTP/2, and gRPC-Web)
GRPC_CONTENT_TYPE = b"application/grpc"
#: a request without a trace context (refused before it was routed)
NO_TRACE = (b"", b"", b"", 0, "")
#: a second traceparent field makes the request's trace context invalid (W3C 3.2.1)
TWO_TRACEPARENTS = b"-"
#: the last head the fast path took: (bytes, Limits, the parsed fields). A client on a
#: keep-alive connection (and a load generator) sends the same head again and again: a
#: bytes compare instead of the regex and the field loop. Per process (one thread).
_last_request: list = [b"", None, None]
_new_request = object.__new__


class Limits:
    """Request size limits (a plain object so the hot path reads attributes, not dicts)."""

    __slots__ = ("request_line", "header_size", "header_count", "headers_total", "body_size")

    def __init__(self, request_line=8192, header_size=8192, header_count=100,
                 headers_total=32768, body_size=1 << 30):
        self.request_line = request_line
        self.header_size = header_size
        self.header_count = header_count
        self.headers_total = headers_total
        self.body_size = body_size  # 0 = unlimited


class Request:
    """One parsed request head, as the proxy needs it."""

    __slots__ = (
        "method", "target", "path", "version", "headers", "host", "content_length",
        "chunked", "keep_alive", "expect_continue", "request_id", "forwarded_for",
        "connection", "upgrade", "header_bytes", "has_body", "traceparent", "tracestate",
        "trace", "grpc",
    )

    def __init__(self):
        self.method = ""
        self.target = b""  # as sent (origin-form or absolute-form)
        self.path = b""  # origin-form path+query forwarded upstream
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []  # end-to-end headers, original case
        self.host = b""
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.request_id = b""
        self.forwarded_for = b""
        self.connection: list[bytes] = []
        self.upgrade = b""
        self.header_bytes = 0  # target + (name + value + 4 per field): what the limits count
        self.has_body = False  # chunked or a non-zero Content-Length, once the head is parsed
        self.traceparent = b""  # as sent (validated by forkproxy.http.tracecontext)
        self.tracestate = b""  # the tracestate fields joined by ","
        #: the trace context the worker gave the request (worker/tracing.py): trace id,
        #: its span id, the client's span id, flags, tracestate; in the ring record's order
        self.trace = NO_TRACE
        #: a gRPC request's content-type (forkproxy/worker/grpc.py); b"": not gRPC
        self.grpc = b""


def trace_field(req: Request, traceparent: bool, value: bytes) -> None:
    """A W3C trace context field (traceparent, else tracestate), for any front end: kept
    for the worker (forkproxy/worker/tracing.py), which validates it and sends its own; a
    second traceparent invalidates the first, tracestate fields are joined."""
    if traceparent:
        req.traceparent = TWO_TRACEPARENTS if req.traceparent else value
    else:
        req.tracestate = req.tracestate + b"," + value if req.tracestate else value


def _framing(msg: str) -> HTTPError:
    return HTTPError(400, msg, kind="framing")


def _classify(e: Exception) -> HTTPError:
    """An llhttp error as the HTTPError the client gets."""
    msg = str(e)
    low = msg.lower()
    if "chunk" in low or "transfer-encoding" in low or "content-length" in low:
        return _framing(f"bad request: {msg}")
    if "invalid http version" in low:
        return HTTPError(400, f"bad request: {msg}", kind="version")
    return HTTPError(400, f"bad request: {msg}")


def _remembered_request(fields: tuple) -> Request:
    """The request of the head the fast path took last (``_last_request``), every field
    stored once (Request() would store its defaults first)."""
    req = _new_request(Request)
    (req.method, req.target, req.path, req.version, headers, req.host, req.keep_alive,
     req.request_id, req.forwarded_for, connection, req.header_bytes, req.traceparent,
     req.tracestate) = fields
    req.headers = headers.copy()
    req.connection = connection.copy()
    req.content_length = None
    req.chunked = req.expect_continue = req.has_body = False
    req.upgrade = req.grpc = b""
    req.trace = NO_TRACE
    return req


class RequestParser:
    """Feed bytes with feed(); pop events from .events.

    feed() raises only for bugs: every client error becomes an ERROR event after the
    events of the complete requests before it (the parser is unusable afterwards)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.events: deque = deque()
        self._parser = None  # llhttp, made the first time the fast path declines a head
        self._req: Request | None = None
        self._emitted = False  # _req went out as a HEAD event (it is not "current")
        #: inside a request head (its first bytes came, its end did not): a plain
        #: attribute, read by the connection before every wait
        self.in_head = False
        self._in_body = False  # between the head and the end of a chunked message
        self._began = False  # a message began during the current feed()
        self._cur = 0  # events the message being parsed queued during this feed()
        self._head_bytes = 0
        self._body_bytes = 0
        self._fed_body = 0  # body bytes produced during the current feed()
        self._overhead = 0  # chunked framing bytes of the current message so far
        self._chunks = 0
        self._fields = 0
        self._trailer_bytes = 0
        self.failed: HTTPError | None = None
        #: the request that upgraded the connection (Connection: Upgrade, a GET without
        #: a body; the connection tunnels it, forkproxy/worker/tunnel.py) and the bytes
        #: the client sent after its head (the start of the tunnel)
        self.upgrade_req: Request | None = None
        self.leftover = b""
        #: llhttp is between messages (no byte of the next one seen): the fast path may
        #: take a whole head without it
        self._boundary = True

    # -- driving ---------------------------------------------------------------------

    def feed(self, data) -> None:
        if self.failed is not None:
            return  # nothing after an error is looked at
        if self._boundary and data[-4:] == b"\r\n\r\n" and self._fast(data):
            return
        self._cur = 0
        self._began = False
        self._fed_body = 0
        try:
            parser = self._parser
            if parser is None:
                parser = self._parser = httptools.HttpRequestParser(self)
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            req = self._req
            if (req is not None and req.upgrade and req.method == "GET" and not req.has_body
                    and self._tunnelable(req)):
                # llhttp stops after the head: the events up to it stay queued, the rest
                # of the bytes belong to the tunnel; nothing more is parsed
                self.upgrade_req = req
                self.leftover = bytes(data[e.args[0]:]) if e.args else b""
                self.failed = HTTPError(400, "data after an upgrade", kind="upgrade")
                return
            # other upgrades (CONNECT, with a body): that message is not served either
            events = self.events
            while events:
                if events.pop()[0] == HEAD:
                    break
            self._cur = 0
            self._fail(HTTPError(501, "protocol upgrade not supported", kind="upgrade"))
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HTTPError):
                self._fail(cause)
                return
            if cause is not None:
                raise cause  # a bug in a callback: the connection logs it and answers 500
            self._fail(HTTPError(400, f"bad request: {e}"))
            return
        except httptools.HttpParserError as e:
            self._fail(_classify(e))
            return
        limits = self.limits
        if self.in_head:
            # a head spread over several reads: httptools buffers the unfinished field,
            # which no callback has counted yet. A head that began in this read is at
            # most one recv buffer; after that every byte read belongs to the head.
            if self._began:
                self._head_bytes = self._req.header_bytes
            else:
                self._head_bytes += len(data)
                if self._head_bytes > limits.headers_total:
                    self._fail(HTTPError(431, "request header too large"))
        elif self._in_body and not self._began:
            # a chunked body spread over reads: everything that was not body is framing
            self._overhead += len(data) - self._fed_body
            if self._overhead > CHUNK_OVERHEAD_BASE + CHUNK_OVERHEAD_PER_CHUNK * self._chunks:
                self._fail(_framing("chunked framing overhead too large"))

    def _fast(self, data) -> bool:
        """One whole GET/HEAD head without a body, alone in ``data``: parsed here with one
        scan (http/headscan.py) instead of llhttp and its callbacks (compiled ~1.8
        us for a wrk head, ~2.9 for a browser's; llhttp's way ~4 and ~10). False: nothing
        was consumed, use llhttp."""
        limits = self.limits
        size = len(data)
        if size > limits.request_line or size > limits.header_size or size > limits.headers_total:
            return False
        head = bytes(data)
        last = _last_request
        if head == last[0] and limits is last[1]:  # the same bytes as the last fast head
            return self._emit_fast(_remembered_request(last[2]))
        scanned = scan_request_head(head)
        if scanned is None:
            return False
        is_get, target, minor_is_0, fields, specials, header_bytes = scanned
        if len(fields) + len(specials) > limits.header_count:
            return False
        req = Request()
        req.headers = fields
        special = _FAST_FIELDS
        for name, value in specials:
            what = special[name]
            if what not in _FAST_SPECIAL:
                return False
            if what == _HOST:
                value = value.rstrip(b" \t")
                if req.host or not HOST_RE.match(value):
                    return False
                req.host = value
            elif what == _CONN:
                if req.connection:
                    return False
                req.connection.append(value)
            elif what == _RID:
                if not req.request_id:
                    req.request_id = value
            elif what >= _TP:  # traceparent, tracestate
                trace_field(req, what == _TP, value)
            else:  # _XFF
                req.forwarded_for = req.forwarded_for + b", " + value if req.forwarded_for else value
        if req.connection:
            token = req.connection[0].strip(b" \t").lower()
            if token == b"close":
                req.keep_alive = False
            elif token != b"keep-alive":
                return False  # other tokens (upgrade, header names): llhttp's reading
            elif minor_is_0:
                req.keep_alive = True
        elif minor_is_0:
            req.keep_alive = False
        if minor_is_0:
            req.version = "1.0"
        elif not req.host:
            return False  # llhttp's path answers the 400
        req.method = "GET" if is_get else "HEAD"
        req.target = req.path = target
        req.header_bytes = header_bytes
        last[0] = head
        last[1] = limits
        last[2] = (req.method, target, target, req.version, req.headers.copy(), req.host,
                   req.keep_alive, req.request_id, req.forwarded_for, req.connection.copy(),
                   header_bytes, req.traceparent, req.tracestate)
        return self._emit_fast(req)

    def _emit_fast(self, req: Request) -> bool:
        self._req = req
        self._emitted = True
        events = self.events
        events.append((HEAD, req))
        events.append((END, None))
        return True

    def _fail(self, err: HTTPError) -> None:
        """Drop the broken message's queued events and queue the error after the rest."""
        events = self.events
        for _ in range(min(self._cur, len(events))):
            events.pop()
        self._cur = 0
        events.append((ERROR, err))
        self.failed = err
        self.in_head = self._in_body = False


    @staticmethod
    def _tunnelable(req: Request) -> bool:
        """Connection: Upgrade was sent along with the Upgrade header."""
        for value in req.connection:
            for tok in value.split(b","):
                if tok.strip().lower() == b"upgrade":
                    return True
        return False

    def current(self) -> Request:
        """The request being parsed (possibly incomplete), for logging a rejection; a
        fresh one when the failure came before its first byte was parsed."""
        req = self._req
        if req is None or self._emitted:
            return Request()
        if not req.path and req.target:
            req.path = bytes(req.target[:1024])  # the log shows what was asked for
        return req

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self):
        self._boundary = False
        self._req = Request()
        self._emitted = False
        self.in_head = True
        self._began = True
        self._cur = 0
        self._head_bytes = 0
        self._body_bytes = 0
        self._overhead = 0
        self._chunks = 0
        self._fields = 0
        self._trailer_bytes = 0

    def on_url(self, url: bytes):
        req = self._req
        req.target += url
        req.header_bytes += len(url)
        if len(req.target) > self.limits.request_line:
            raise HTTPError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes):
        req = self._req
        size = len(name) + len(value)
        limits = self.limits
        if size > limits.header_size:
            raise HTTPError(431, "header line too large")
        if BAD_VALUE_RE.search(value) or not TOKEN_RE.match(name):
            raise HTTPError(400, "invalid character in header")
        if not self.in_head:
            # a trailer field (after the last chunk): checked, counted, never forwarded
            self._trailer_bytes += size + 4
            if self._trailer_bytes > limits.header_size:
                raise HTTPError(431, "trailer section too large")
            return
        req.header_bytes += size + 4
        self._fields += 1
        if self._fields > limits.header_count:
            raise HTTPError(431, "too many headers")
        if req.header_bytes > limits.headers_total:
            raise HTTPError(431, "request header too large")
        what = _SPECIAL.get(name.lower())
        if what is None:  # most fields: forwarded as they came
            req.headers.append((name, value))
            return
        if what == _HOST:
            if req.host:
                raise HTTPError(400, "duplicate Host", kind="host")
            value = value.rstrip(b" \t")
            if not HOST_RE.match(value):
                raise HTTPError(400, "invalid Host", kind="host")
            req.host = value  # re-emitted first by the upstream head builder
        elif what == _CONN:
            req.connection.append(value)
        elif what == _CL:
            if not value.isdigit() or len(value) > 18:
                raise _framing("invalid Content-Length")
            n = int(value)
            if req.content_length is not None and req.content_length != n:
                raise _framing("conflicting Content-Length")
            req.content_length = n
        elif what == _TE:
            if req.chunked:
                raise _framing("more than one Transfer-Encoding")
            coding = value.rstrip(b" ").lower()
            if coding != b"chunked":
                codings = [c.strip(b" ") for c in coding.split(b",")]
                if (len(codings) > 1 and codings[-1] == b"chunked"
                        and all(TOKEN_RE.match(c) and c != b"chunked" for c in codings[:-1])):
                    # well-formed but not ours to decode (nginx answers the same)
                    raise HTTPError(501, "transfer coding not implemented", kind="framing")
                raise _framing("unsupported Transfer-Encoding")
            req.chunked = True
        elif what == _RID:
            if not req.request_id:
                req.request_id = value
        elif what == _XFF:
            req.forwarded_for = req.forwarded_for + b", " + value if req.forwarded_for else value
        elif what >= _TP:  # traceparent, tracestate
            trace_field(req, what == _TP, value)
        elif what == _EXPECT:
            if value.strip().lower() != b"100-continue":
                raise HTTPError(417, "unsupported Expect")
            req.expect_continue = True
        elif what == _UPGRADE:
            req.upgrade = value
        elif what == _CT:
            req.headers.append((name, value))
            if value.startswith(GRPC_CONTENT_TYPE):
                req.grpc = value
        elif what == _UNDERSCORE:
            raise _framing(f"{name.decode('latin-1')}: framing header spelled with '_'")
        # _DROP: hop-by-hop, never forwarded

    def on_headers_complete(self):
        req = self._req
        p = self._parser
        req.method = p.get_method().decode("ascii", "replace")
        version = req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        req.has_body = req.chunked or bool(req.content_length)
        self.in_head = False
        if req.method == "CONNECT":
            raise HTTPError(501, "CONNECT not supported", kind="upgrade")
        if version != "1.1" and version != "1.0":
            if version[0] in "23456789":
                raise HTTPError(505, f"HTTP/{version} not supported")
            raise HTTPError(400, f"HTTP/{version} not supported", kind="version")
        if req.chunked:
            if req.content_length is not None:
                raise _framing("Content-Length with Transfer-Encoding")
            if version == "1.0":
                raise _framing("Transfer-Encoding in HTTP/1.0")
            self._in_body = True
        limit = self.limits.body_size
        if limit and req.content_length is not None and req.content_length > limit:
            raise HTTPError(413, "request body too large")
        target = req.target
        if b"#" in target:
            raise HTTPError(400, "fragment in request target", kind="target")
        if target.startswith(b"/"):
            req.path = target
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            rest = target.split(b"://", 1)[1]
            end = len(rest)
            for sep in (b"/", b"?"):
                i = rest.find(sep)
                if 0 <= i < end:
                    end = i
            authority, path = rest[:end], rest[end:]
            if not HOST_RE.match(authority):
                raise HTTPError(400, "invalid absolute-form target", kind="target")
            if req.host and req.host.lower() != authority.lower():
                raise HTTPError(400, "Host differs from the absolute-form target", kind="host")
            req.host = authority
            req.path = path if path.startswith(b"/") else b"/" + path
        elif target == b"*" and req.method == "OPTIONS":
            req.path = target
        else:
            raise HTTPError(400, "invalid request target", kind="target")
        if not req.host and version != "1.0":
            raise HTTPError(400, "missing Host", kind="host")
        self.events.append((HEAD, req))
        self._emitted = True
        self._cur += 1

    def on_chunk_header(self):
        self._chunks += 1

    def on_body(self, body: bytes):
        n = len(body)
        self._body_bytes += n
        self._fed_body += n
        limit = self.limits.body_size
        if limit and self._body_bytes > limit:
            raise HTTPError(413, "request body too large")
        self.events.append((BODY, body))
        self._cur += 1

    def on_message_complete(self):
        self._boundary = True
        self._in_body = False
        self.events.append((END, None))
        self._cur = 0  # a complete message's events are never dropped
