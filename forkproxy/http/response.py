"""Sans-IO upstream response parsing with the same strictness as requests.

The head is handed to httptools as exactly the bytes up to the blank line, so the
proxy knows where the body starts: Content-Length bodies are then copied straight
through without touching the parser (it cost 15% CPU on 1 MiB bodies in the probe);
chunked bodies keep going through the parser, which de-chunks them.

Rejected (the exchange is a 502 and the upstream connection is closed, never pooled):
whatever llhttp's strict mode refuses (obs-fold, bare CR/LF, whitespace before a colon,
CTL/NUL in header values, CL with TE, duplicate Content-Length, bad chunk framing), and
on top: a protocol other than HTTP/1.0 or HTTP/1.1, a status outside 100-599, control
bytes in the reason phrase (it is copied into the client's status line), invalid header
names, a Transfer-Encoding other than exactly ``chunked``, conflicting Content-Length, a
head over 64 KiB.

Fields named in ``Connection`` are hop-by-hop too (RFC 9110 section 7.6.1) and are not
relayed: fast_head() takes only a ``Connection`` of exactly ``close`` or ``keep-alive``
(anything naming a field goes to the parser), and ResponseParser drops the named fields.
"""

from __future__ import annotations

import httptools

from forkproxy.http.headscan import judge_response_head
from forkproxy.http.messages import (
    BAD_VALUE_RE,
    HOP_BY_HOP,
    REASON_RE,
    TOKEN_RE,
    connection_tokens,
)
from forkproxy.http.trailers import MAX_TRAILER_BYTES

HEAD_END = b"\r\n\r\n"
#: the largest response head relayed, however it arrives (one read or many)
MAX_HEAD = 64 * 1024


#: the last head fast_head() judged and its verdict: an origin answers the same resource
#: with the same bytes until its Date changes, so most heads are this one again (a bytes
#: compare instead of a scan). Per process; fast_head is a pure function.
_last_head: list = [b"", None]


def fast_head(head: bytes) -> tuple[int, int, bool, bytes] | None:
    """headscan.judge_response_head's verdict on ``head``: (status, content_length,
    upstream_keep_alive, the head to relay), or None for the full parser."""
    last = _last_head
    if head == last[0]:
        return last[1]
    verdict = judge_response_head(head)
    last[0] = head
    last[1] = verdict
    return verdict


_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})


def _drop_connection_named(head: ResponseHead) -> None:
    """Remove the fields the upstream's Connection names (RFC 9110 section 7.6.1): they
    were meant for this hop only."""
    named = connection_tokens(head.connection) - _CONNECTION_OPTIONS
    if named:
        head.headers = [(n, v) for n, v in head.headers if n.lower() not in named]


class BadResponse(Exception):
    """The upstream sent something we will not relay (answered 502, connection dropped)."""


class ResponseHead:
    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked",
                 "keep_alive", "connection")

    def __init__(self):
        self.status = 0
        self.reason = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.connection: list[bytes] = []


class ResponseParser:
    """One per upstream exchange. parse_head() then, for chunked bodies, feed_body()."""

    __slots__ = ("_parser", "head", "_sink", "complete", "extra", "trailers",
                 "_trailer_bytes")

    def __init__(self):
        self._parser = httptools.HttpResponseParser(self)
        self.head = ResponseHead()
        self._sink = None
        self.complete = False
        self.extra = False  # bytes arrived after the end of the message
        #: the chunked body's trailer fields as they came (None: none), checked for
        #: characters and size; forkproxy.http.trailers filters them before relaying
        self.trailers = None
        self._trailer_bytes = 0

    def parse_head(self, data) -> ResponseHead:
        if data[:9] not in (b"HTTP/1.1 ", b"HTTP/1.0 "):
            raise BadResponse("not an HTTP/1.x response")
        if len(data) > MAX_HEAD:
            raise BadResponse("response head too large")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            raise BadResponse(str(cause) if cause else str(e))
        except httptools.HttpParserError as e:
            raise BadResponse(f"malformed response head: {e}")
        except httptools.HttpParserUpgrade:
            pass  # a 101 with Upgrade: the head is complete, a tunnel follows (the caller's)
        head = self.head
        if head.status == 0:
            raise BadResponse("incomplete response head")
        if not 100 <= head.status <= 599:
            raise BadResponse(f"invalid status {head.status}")
        if head.reason and not REASON_RE.match(head.reason):
            raise BadResponse("invalid character in the reason phrase")
        return head

    def feed_body(self, data, sink) -> None:
        """De-chunk `data`, calling sink(piece) for each body piece."""
        self._sink = sink
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if cause is not None and not isinstance(cause, BadResponse):
                raise cause  # the sink failed (client went away): not the upstream's fault
            raise BadResponse(str(cause) if cause else str(e))
        except httptools.HttpParserError as e:
            raise BadResponse(f"malformed response body: {e}")
        finally:
            self._sink = None

    # -- callbacks -------------------------------------------------------------------

    def on_message_begin(self):
        if self.head.status:
            self.extra = True
            raise BadResponse("data after the end of the response")

    def on_status(self, reason: bytes):
        self.head.reason += reason

    def on_header(self, name: bytes, value: bytes):
        head = self.head
        if BAD_VALUE_RE.search(value) or not TOKEN_RE.match(name):
            raise BadResponse("invalid character in response header")
        if head.status:  # after the head: a field of the chunked body's trailer section
            self._trailer(name, value)
            return
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise BadResponse("invalid Content-Length in response")
            n = int(value)
            if head.content_length is not None and head.content_length != n:
                raise BadResponse("conflicting Content-Length in response")
            head.content_length = n
        elif lname == b"transfer-encoding":
            if head.chunked or value.rstrip(b" ").lower() != b"chunked":
                raise BadResponse("unsupported Transfer-Encoding in response")
            head.chunked = True
        elif lname == b"connection":
            head.connection.append(value)
        elif lname not in HOP_BY_HOP:
            head.headers.append((name, value))

    def _trailer(self, name: bytes, value: bytes) -> None:
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > MAX_TRAILER_BYTES:
            raise BadResponse("trailer section too large")
        if self.trailers is None:
            self.trailers = [(name, value)]
        else:
            self.trailers.append((name, value))

    def on_headers_complete(self):
        head = self.head
        p = self._parser
        head.status = p.get_status_code()
        head.version = p.get_http_version()
        # httptools reports False once the message is complete: read it here
        head.keep_alive = p.should_keep_alive()
        if head.chunked and head.content_length is not None:
            raise BadResponse("Content-Length with Transfer-Encoding in response")
        if head.connection:
            _drop_connection_named(head)

    def on_body(self, body: bytes):
        if self._sink is not None:
            self._sink(body)

    def on_message_complete(self):
        self.complete = True
