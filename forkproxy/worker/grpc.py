"""gRPC requests in the exchange: the deadline ``grpc-timeout`` gives, the proxy's own
failures answered as a gRPC status, and the status the request context records.

A request is gRPC when its content-type starts with ``application/grpc`` (the parsers
set ``req.grpc``); nothing here runs for any other request.

- ``grpc-timeout`` (1 to 8 digits and a unit: H, M, S, m, u, n; gRPC's PROTOCOL-HTTP2)
  starts a libev timer for the request. When it fires, ``Deadline`` is thrown into the
  front end's greenlet wherever it waits (connect, pool queue, send, response head,
  body), like the worker's per-step timeouts, which still apply: whichever is first
  ends the request. Past the deadline there is no retry, and the server is not counted
  as failing (the client chose the deadline). An invalid value is refused with
  INTERNAL and a message that says why, as gRPC servers do.
- A failure of the proxy itself is answered HTTP 200, trailers-only (for HTTP/2, one
  HEADERS frame with END_STREAM): ``content-type`` as the request's, ``grpc-status``,
  ``grpc-message``. The code says what happened (:data:`PROXY_CODES`): no server,
  refused, reset, TLS failure: 14 UNAVAILABLE; a timeout or the deadline: 4
  DEADLINE_EXCEEDED; too large or rate-limited: 8 RESOURCE_EXHAUSTED; forbidden: 7
  PERMISSION_DENIED.
- The recorded status: the proxy's own; else the response's ``grpc-status`` (trailers,
  or the head of a trailers-only response); else what a gRPC client makes of the HTTP
  status (gRPC's http-grpc-status-mapping: 429 and 502-504 are 14, 404 is 12...).
"""

from __future__ import annotations

import re

from gevent import getcurrent

from forkproxy.http.forward import response_fields
from forkproxy.http.grpcstatus import (
    DEADLINE_EXCEEDED,
    HTTP_CODES,
    UNKNOWN,
    proxy_answer,
)
from forkproxy.worker.front import Deadline

TIMEOUT_RE = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_STATUS_RE = re.compile(rb"[0-9]{1,3}")


def parse_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` value; ValueError saying why it is invalid."""
    m = TIMEOUT_RE.fullmatch(value)
    if m is None:
        shown = value[:32].decode("ascii", "replace")
        raise ValueError(f"invalid grpc-timeout {shown!r}: 1 to 8 digits, then a unit "
                         "(H, M, S, m, u or n)")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _field(fields, name: bytes) -> bytes | None:
    """The value of field ``name`` (lower-case), whatever the case of the names:
    lower-cased only when the length matches (a call per request looks for a field
    most requests do not have)."""
    size = len(name)
    for n, v in fields:
        if len(n) == size and n.lower() == name:
            return v
    return None


# -- the deadline -------------------------------------------------------------------------


def forward(ex, upstream) -> bool:
    """Exchange.forward for a gRPC request, within its ``grpc-timeout`` (if any)."""
    value = _field(ex.req.headers, b"grpc-timeout")
    if value is None:
        return ex.forward(upstream)
    try:
        seconds = parse_timeout(value)
    except ValueError as e:
        ex.reject = "grpc_timeout"
        return ex.fail(400, None, str(e))
    timer = ex.ws.hub.loop.timer(seconds)
    timer.start(_expired, ex, getcurrent())
    try:
        return ex.forward(upstream)
    finally:
        timer.stop()
        timer.close()


def _expired(ex, greenlet) -> None:
    """In the hub: the request's deadline passed while its greenlet waits."""
    ex.expired = True
    ex.tries = 0  # no retry past the deadline
    if not greenlet.dead:
        greenlet.throw(Deadline("grpc-timeout exceeded"))


# -- answers and records ------------------------------------------------------------------


def answer(ex, status: int, detail: str) -> tuple[bool, str]:
    """Answer the proxy's failure ``status`` as a gRPC status (trailers-only); returns
    the front end's keep-alive and the detail to record."""
    if ex.expired:
        detail = f"grpc-timeout exceeded: {detail}"
        code, fields = proxy_answer(ex.req.grpc, 0, detail)
    else:
        code, fields = proxy_answer(ex.req.grpc, status, detail)
    ex.grpc_status = code
    return ex.front.send_trailers_only(fields), detail


def trailers_status(ex, fields) -> None:
    """The grpc-status of a response's trailer section, for the record."""
    code = _field(fields, b"grpc-status")
    if code is not None and _STATUS_RE.fullmatch(code):
        ex.grpc_status = int(code)


def recorded_status(ex, status: int) -> int:
    """The gRPC status of the request being recorded (and the exchange's gRPC state
    cleared for the next request on the front end)."""
    code = ex.grpc_status
    expired = ex.expired
    ex.grpc_status = -1
    ex.expired = False
    if expired:
        return DEADLINE_EXCEEDED
    if code >= 0:
        return code
    if ex.conn is not None:  # a relayed response: a trailers-only one carries the status
        fields = response_fields(ex.raw_head) if ex.raw_head is not None else ex.rhead.headers
        value = _field(fields, b"grpc-status")
        if value is not None and _STATUS_RE.fullmatch(value):
            return int(value)
    if status == 200:
        return UNKNOWN  # no grpc-status anywhere: a gRPC client reports an error too
    return HTTP_CODES.get(status, UNKNOWN)
