"""Sans-IO request parsing: bytes in, events out, strict framing.

httptools (llhttp, strict mode) does the tokenising; this layer adds what a proxy must
enforce on top (RFC 9112 framing rules, smuggling defences, size limits) and turns the
callbacks into a queue of events so the connection loop can serve pipelined requests in
order: ``(HEAD, Request)``, ``(BODY, bytes)``, ``(END, None)``. At most one recv buffer
of events is ever queued, because the loop only feeds more bytes when the queue is empty.
"""

from __future__ import annotations

from collections import deque

import httptools

from forkproxy.http.messages import BAD_VALUE_RE, TOKEN_RE, HTTPError

HEAD, BODY, END = 1, 2, 3


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
        "connection", "upgrade", "header_bytes",
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
        self.header_bytes = 0

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class RequestParser:
    """Feed bytes with feed(); pop events from .events. Raises HTTPError on bad input."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.events: deque = deque()
        self._parser = httptools.HttpRequestParser(self)
        self._req: Request | None = None
        self._in_head = False
        self._head_bytes = 0
        self._body_bytes = 0

    # -- driving ---------------------------------------------------------------------

    def feed(self, data) -> None:
        try:
            self._parser.feed_data(data)
        except HTTPError:
            raise
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: the head is complete; tunnelling is not supported here
            raise HTTPError(501, "protocol upgrade not supported")
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HTTPError):
                raise cause
            raise HTTPError(400, f"bad request: {e}")
        except httptools.HttpParserError as e:
            raise HTTPError(400, f"bad request: {e}")
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.headers_total:
                raise HTTPError(431, "request header too large")

    @property
    def in_head(self) -> bool:
        return self._in_head

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self):
        self._req = Request()
        self._in_head = True
        self._head_bytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes):
        req = self._req
        req.target += url
        if len(req.target) > self.limits.request_line:
            raise HTTPError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes):
        req = self._req
        size = len(name) + len(value)
        req.header_bytes += size
        if size > self.limits.header_size:
            raise HTTPError(431, "header line too large")
        if len(req.headers) >= self.limits.header_count:
            raise HTTPError(431, "too many headers")
        if BAD_VALUE_RE.search(value) or not TOKEN_RE.match(name):
            raise HTTPError(400, "invalid character in header")
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise HTTPError(400, "invalid Content-Length")
            n = int(value)
            if req.content_length is not None and req.content_length != n:
                raise HTTPError(400, "conflicting Content-Length")
            req.content_length = n
            return
        if lname == b"transfer-encoding":
            if req.chunked or value.strip().lower() != b"chunked":
                raise HTTPError(400, "unsupported Transfer-Encoding")
            req.chunked = True
            return
        if lname == b"host":
            if req.host:
                raise HTTPError(400, "duplicate Host")
            req.host = value
            return  # re-emitted first by the upstream head builder
        elif lname == b"connection":
            req.connection.append(value)
            return
        elif lname == b"x-request-id":
            if req.request_id:
                return
            req.request_id = value
            return
        elif lname == b"x-forwarded-for":
            req.forwarded_for = req.forwarded_for + b", " + value if req.forwarded_for else value
            return
        elif lname == b"expect":
            if value.strip().lower() == b"100-continue":
                req.expect_continue = True
            else:
                raise HTTPError(417, "unsupported Expect")
            return
        elif lname in (b"keep-alive", b"proxy-connection", b"te", b"trailer"):
            return
        elif lname == b"upgrade":
            req.upgrade = value
            return
        req.headers.append((name, value))

    def on_headers_complete(self):
        req = self._req
        p = self._parser
        req.method = p.get_method().decode("ascii", "replace")
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        self._in_head = False
        if req.chunked and req.content_length is not None:
            raise HTTPError(400, "Content-Length with Transfer-Encoding")
        if req.chunked and req.version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in HTTP/1.0")
        limit = self.limits.body_size
        if limit and req.content_length is not None and req.content_length > limit:
            raise HTTPError(413, "request body too large")
        target = req.target
        if target.startswith(b"/"):
            req.path = target
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            rest = target.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if b"@" in authority or not authority:
                raise HTTPError(400, "invalid absolute-form target")
            if req.host and req.host.lower() != authority.lower():
                raise HTTPError(400, "Host differs from the absolute-form target")
            req.host = authority
            req.path = path
        elif target == b"*" and req.method == "OPTIONS":
            req.path = target
        else:
            raise HTTPError(400, "invalid request target")
        if not req.host and req.version != "1.0":
            raise HTTPError(400, "missing Host")
        self.events.append((HEAD, req))

    def on_body(self, body: bytes):
        self._body_bytes += len(body)
        limit = self.limits.body_size
        if limit and self._body_bytes > limit:
            raise HTTPError(413, "request body too large")
        self.events.append((BODY, body))

    def on_message_complete(self):
        self.events.append((END, None))
