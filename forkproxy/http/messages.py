"""Sans-IO HTTP/1.1 message pieces shared by the downstream and upstream sides.

Nothing here touches a socket: header classification, head serialisation and the
prebuilt error responses, so they are tested by feeding bytes in.
"""

from __future__ import annotations

import re

#: hop-by-hop headers never forwarded in either direction (RFC 9110 7.6.1); lower-case
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",  # re-framed by us from what was parsed
    }
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: bytes a header value may not contain (RFC 9110 5.5: no CTL except HTAB)
BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: a valid header name (token)
TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: a Host header or absolute-form authority: reg-name or IP literal, optional port
#: (RFC 3986 3.2.2; no userinfo, no "/", "\\", whitespace, controls or 8-bit bytes).
#: Colons are allowed inside the name like nginx does: clients send "::1:8080".
HOST_RE = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%:]+)(?::[0-9]{1,5})?\Z")
#: a response reason phrase (RFC 9112 4: HTAB, SP, VCHAR, obs-text)
REASON_RE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*\Z")

REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

#: the ``reason`` label of ``forkproxy_rejected_total`` for a status, unless the raiser
#: names a more precise one (``framing``, ``header_timeout``, ``rate_limited``, ...)
REJECT_KINDS = {
    400: "bad_request",
    408: "timeout",
    413: "body_too_large",
    414: "uri_too_long",
    417: "expectation",
    429: "rate_limited",
    431: "headers_too_large",
    501: "not_implemented",
    505: "version",
}


class HTTPError(Exception):
    """A request the proxy answers itself with `status`; close=True means the framing is
    no longer trustworthy and the connection must close after the response. ``kind`` is
    the short reason counted in ``forkproxy_rejected_total{reason}``."""

    def __init__(self, status: int, reason: str = "", close: bool = True, kind: str = ""):
        super().__init__(reason or REASONS.get(status, b"").decode())
        self.status = status
        self.close = close
        self.kind = kind or REJECT_KINDS.get(status, "error")


def error_response(status: int, close: bool, detail: str = "") -> bytes:
    """A complete small text/plain response the proxy generates itself."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %s\n" % (status, reason)
    if detail:
        body = body[:-1] + b": " + detail.encode("latin-1", "replace") + b"\n"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Server: forkproxy\r\nContent-Type: text/plain\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


_PREBUILT = {(s, c): error_response(s, c) for s in REASONS if s >= 400 for c in (True, False)}


def prebuilt_error(status: int, close: bool) -> bytes:
    return _PREBUILT.get((status, close)) or error_response(status, close)


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-cased tokens of all Connection header values."""
    out: set[bytes] = set()
    for v in values:
        for tok in v.split(b","):
            tok = tok.strip().lower()
            if tok:
                out.add(tok)
    return out
