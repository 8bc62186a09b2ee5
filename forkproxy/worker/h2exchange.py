"""One try of an exchange over an HTTP/2 upstream stream (``protocol = "h2c"`` / ``"h2"``).

The exchange (forkproxy/worker/exchange.py) picks servers, retries and records the same
way for both protocols; an upstream chooses once how a try is made: HTTP/1.1 bytes on a
pooled connection (``Exchange.send_and_relay``), or :func:`send_and_relay` here, on a
stream of a multiplexed connection (forkproxy/worker/h2conn.py).

Both directions stream at once (gRPC's bidirectional calls need it): a helper greenlet
copies the request body from the front end to the stream, waiting while the upstream's
window is closed, while the exchange's greenlet relays the response, giving the stream
window back only as the front end takes each piece (so the upstream never sends faster
than the client drains).

A stream the upstream refused (REFUSED_STREAM, or above a GOAWAY's last stream id) was
not processed: retried at once on another connection when the request can be replayed.
A reset or lost connection before the response head is a "reset" (retry_on); after it,
the client's response is cut short like an HTTP/1.1 upstream's.
"""

from __future__ import annotations

import time
from http import HTTPStatus

import gevent
from gevent import socket

from forkproxy.context import T_END, T_FIRST_BYTE, T_SENT
from forkproxy.http.framing import Framing, response_framing
from forkproxy.http.response import ResponseHead
from forkproxy.http2 import client as h2c
from forkproxy.http2 import nghttp2 as ng
from forkproxy.worker.failures import UpstreamBroken, UpstreamFailed
from forkproxy.worker.front import BodyAborted, ClientGone
from forkproxy.worker.h2conn import CONN_LOST, PING_TIMEOUT, SEND_BUFFER, H2Stream

_timeout = socket.timeout
_monotonic = time.monotonic
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def send_and_relay(ex, fields, stream: H2Stream) -> bool:
    """One try on one stream: the request, its body (streamed), the response head,
    body and trailers relayed; returns the front end's keep-alive."""
    req = ex.req
    front = ex.front
    if req.has_body and req.expect_continue:
        front.send_continue()
    if not stream.submit(fields, not req.has_body):
        raise UpstreamFailed(502, "upstream HTTP/2 connection gone", retryable=stream.reused,
                             kind="reset")
    pump = None
    try:
        if req.has_body and not _send_buffered(ex, stream):
            stream.pumped = True
            pump = gevent.spawn(_pump_body, ex, stream)
        ex.times[T_SENT] = _monotonic()
        head = _read_head(ex, stream, pump)
        return _relay(ex, stream, head, pump)
    finally:
        if pump is not None and not pump.dead:
            pump.kill(block=False)


def _send_buffered(ex, stream: H2Stream) -> bool:
    """The request body the front end already holds, queued on the stream without
    waiting (a unary gRPC call's whole body usually came with its head); True when that
    was all of it, else the pump greenlet sends the rest. Spawning that greenlet costs
    more than the rest of the call's body handling (and a 16 KiB frame stack mmap'd
    and freed per greenlet by CPython)."""
    front = ex.front
    try:
        while front.body_buffered():
            data = front.read_body()
            if data is None:
                stream.end(front.request_trailers)
                return True
            ex.bytes_in += len(data)
            if not stream.queue(data):
                return True  # the stream is gone: the response side says why
            if stream.conn.session.pending(stream.sid) > SEND_BUFFER:
                return False  # the upstream's window is full: the pump waits for it
    except (BodyAborted, ClientGone) as e:
        stream.cancel()
        raise _body_failed(ex, e)
    return False


def _pump_body(ex, stream: H2Stream):
    """The request body, front end to stream (in its own greenlet). Returns None, or
    the exception that ended it (the exchange's greenlet raises it)."""
    front = ex.front
    timeout = stream.server.cfg.send_timeout
    try:
        while True:
            data = front.read_body()
            if data is None:
                stream.end(front.request_trailers)  # an HTTP/2 client's, filtered
                return None
            ex.bytes_in += len(data)
            if not stream.send(data, timeout):
                return None  # the stream is gone: the response side says why
    except (BodyAborted, ClientGone, _timeout) as e:
        stream.cancel()
        stream.items.append((0, e))  # wakes the exchange's greenlet with the failure
        stream.event.set()
        return e


def _body_failed(ex, e):
    if isinstance(e, BodyAborted):
        ex.reject = e.reason
        return UpstreamFailed(e.status, "request body failed")
    if isinstance(e, ClientGone):
        return e
    return UpstreamFailed(504, "upstream send timeout", kind="timeout")


def _read_head(ex, stream: H2Stream, pump):
    """Wait for the final response head (interim ones skipped); (status, fields)."""
    timeout = stream.server.head_timeout
    while True:
        try:
            kind, payload = stream.next_item(ex.front, timeout)
        except _timeout:
            raise UpstreamFailed(504, "upstream read timeout", kind="timeout")
        if kind == h2c.HEAD:
            ex.times[T_FIRST_BYTE] = _monotonic()
            return payload
        if kind == h2c.CLOSED:
            raise _closed_early(stream, payload)
        if kind == 0:
            raise _body_failed(ex, payload)
        if kind == h2c.INTERIM:
            status, fields = payload
            # a 100 only if the proxy did not answer the client's Expect itself
            if status != 100 or not ex.req.expect_continue:
                ex.front.send_interim(status, fields)


def _closed_early(stream: H2Stream, code: int) -> UpstreamFailed:
    """The stream ended before its response head: why, and whether it may go again."""
    if code == ng.REFUSED_STREAM:  # not processed (RFC 9113 section 8.7): sent again at
        # once, uncounted, if the connection had served before (a GOAWAY mid-load); on a
        # connection's first stream it is a counted retry (a server refusing everything
        # must not be tried forever)
        return UpstreamFailed(502, "upstream refused the stream (REFUSED_STREAM or GOAWAY)",
                              retryable=stream.reused, kind="reset")
    if code == PING_TIMEOUT:  # the server stopped answering: not retried on it
        return UpstreamFailed(502, "upstream HTTP/2 PING timeout", kind="timeout")
    if code == CONN_LOST:
        return UpstreamFailed(502, "upstream HTTP/2 connection lost", kind="reset",
                              retryable=stream.reused)
    return UpstreamFailed(502, f"upstream reset the stream (HTTP/2 error {code})",
                          kind="reset")


def _relay(ex, stream: H2Stream, head, pump) -> bool:
    # the session took content-length out of the fields (nghttp2 checked it, and
    # checks the body against it); the list is this response's own
    status, fields, length = head
    if ex.retry_statuses is not None and status in ex.retry_statuses:
        raise UpstreamFailed(status, f"upstream answered {status}", kind="status")
    rhead = ResponseHead()
    rhead.status = ex.status = status
    rhead.reason = _REASONS.get(status, b"")
    rhead.headers = fields
    items = stream.items
    if items and items[0][0] == h2c.END and not length:
        # the HEADERS frame ended the stream (gRPC's trailers-only responses): so does
        # the client's response head, with a length of 0 over HTTP/1.1
        rhead.content_length = ex.content_length = 0
        framing = Framing.NONE
    else:
        rhead.content_length = ex.content_length = length
        rhead.chunked = length is None
        framing = response_framing(ex.req.method, status, length, length is None)
    ex.framing = framing
    ex.rhead = rhead
    ex.raw_head = None
    ex.server = stream.server
    ex.conn = stream
    front = ex.front
    first = b""
    if framing is Framing.LENGTH and items and items[0][0] == h2c.DATA:
        first = items.popleft()[1]  # arrived with the head: sent with it (one write)
        ex.bytes_out = len(first)
    try:
        front.send_head(ex, first)
        if first:
            stream.consume(len(first))
        _relay_body(ex, stream, framing)
        keep = front.end_body()
    except UpstreamBroken as e:
        error = str(e)
    except ClientGone:
        error = "client gone"
    else:
        stream.reusable = True
        ex.times[T_END] = _monotonic()
        ex.record(status, ex.bytes_out, "")
        return keep and (pump is None or pump.dead)  # an unread request body: close
    ex.times[T_END] = _monotonic()
    ex.record(status, ex.bytes_out, error)
    return False


def _relay_body(ex, stream: H2Stream, framing) -> None:
    """Response body pieces to the front end until END, and the trailers (gRPC's
    grpc-status) through the exchange's filter to the front end."""
    front = ex.front
    timeout = max(stream.server.cfg.read_timeout, ex.ws.send_timeout)
    while True:
        try:
            kind, payload = stream.next_item(ex.front, timeout)
        except _timeout:
            raise UpstreamBroken("upstream body: read timeout")
        if kind == h2c.DATA:
            if framing is not Framing.NONE:
                ex.bytes_out += len(payload)
                front.send_body(payload)
            stream.consume(len(payload))
        elif kind == h2c.TRAILERS:
            ex.relay_trailers(payload)
        elif kind == h2c.END:
            return
        elif kind == h2c.CLOSED:
            raise UpstreamBroken(f"upstream stream closed mid-body ({payload})")
        elif kind == 0:
            e = _body_failed(ex, payload)
            raise e if isinstance(e, ClientGone) else UpstreamBroken(str(e))
