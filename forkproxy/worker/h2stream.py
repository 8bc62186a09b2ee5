"""One request of an HTTP/2 client connection: the front end of one exchange.

Streams are pooled per connection (:mod:`forkproxy.worker.http2`): when a stream's
exchange is over, its object, its :class:`~forkproxy.worker.exchange.Exchange`, its Event
and its greenlet wait (parked in the hub, no timer, no watcher) for the connection's next
request instead of being allocated per stream; waking a parked greenlet is one loop
callback, where spawning one cost several times that (docs/BENCHMARKS.md, HTTP/2).

Streams never touch the socket: they queue response bytes in the connection's session and
wake the connection's greenlet, which writes. A stream waits while more than
``send_buffer`` bytes of its own are queued (the client's window is closed or its
connection slow), so reading from its upstream pauses and memory stays bounded.
"""

from __future__ import annotations

import time

from gevent import get_hub, getcurrent
from gevent.event import Event

from forkproxy.http.forward import response_fields
from forkproxy.http.framing import Framing
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.session import BODY_TOO_LARGE, nv_array
from forkproxy.http2.translate import response_fields as h2_fields
from forkproxy.worker import faults, grpc
from forkproxy.worker.exchange import MAX_RESPONSE_HEAD, Exchange
from forkproxy.worker.front import BodyAborted, ClientGone, Deadline
from forkproxy.worker.h2conn import H2Stream
from forkproxy.worker.http2front import Http2FrontEnd

_monotonic = time.monotonic
#: buffers kept for the streams' exchanges, per worker (see StreamBuffers)
STREAM_BUFFERS_KEPT = 256


class StreamBuffers:
    """The exchange buffers of a worker's HTTP/2 streams. A stream's response goes out in
    DATA frames of at most max_frame_size and pauses above ``send_buffer`` queued bytes,
    so it needs no ``buffer_size`` (256 KiB) buffer: one of the largest response head
    the exchange reads (64 KiB; the head limit is the same) does, and hundreds of streams
    in flight then neither zero 256 KiB each nor hold 256 KiB each."""

    __slots__ = ("size", "free")

    def __init__(self, buffer_size: int):
        self.size = min(buffer_size, MAX_RESPONSE_HEAD)
        self.free: list[bytearray] = []

    def get_buffer(self) -> bytearray:
        return self.free.pop() if self.free else bytearray(self.size)

    def put_buffer(self, buf: bytearray) -> None:
        if len(self.free) < STREAM_BUFFERS_KEPT:
            self.free.append(buf)


class _HeadMemo:
    """The last response head's nghttp2_nv array, per worker: an upstream answers the
    same head bytes over and over (within its Date's second), and nghttp2 copies the
    fields at submit, so the array is reused instead of split, translated and built
    again (~5 µs per request)."""

    __slots__ = ("raw", "length", "status", "nva", "count", "keep")

    def __init__(self):
        self.raw = None
        self.length = None
        self.status = 0
        self.nva = None
        self.count = 0
        self.keep = None


_memo = _HeadMemo()


class Http2Stream(Http2FrontEnd):
    """One request of an HTTP/2 connection (a pooled object: :meth:`begin` starts each)."""

    __slots__ = ("conn", "ws", "listener", "remote", "remote_b", "tls_resumed",
                 "tls_version", "deadline", "greenlet", "parked", "stream", "req", "body",
                 "event", "closed", "blocked", "responded", "t_accept", "t_tls",
                 "trailers", "request_trailers", "ended", "exchange", "starting", "whole")

    def __init__(self, conn):
        self.conn = conn
        self.ws = conn.ws
        self.listener = conn.listener
        self.remote = conn.remote
        self.remote_b = conn.remote_b
        self.tls_resumed = conn.tls_resumed
        self.tls_version = conn.tls_version
        self.deadline = 0.0
        self.greenlet = None
        self.parked = None  # never parked (the sweeper reads it)
        self.stream = 0
        self.req = None
        self.body: list = []  # request body pieces from the connection; None = the end
        self.event = Event()
        self.closed = None  # the stream's close code once the session closed it
        self.blocked = False  # waiting for its queued response bytes to drain
        self.responded = False
        self.trailers = None  # response trailers for end_body()
        self.ended = False  # the response is complete (end_body or send_error)
        self.request_trailers = None
        self.t_accept = 0.0
        self.t_tls = 0.0
        self.exchange = Exchange(conn.ws, self, conn.buffers)
        self.starting = False  # handed a request, its greenlet not yet running it
        self.whole = False  # send_head submitted all of the response (set there)

    def begin(self, sid: int, req) -> None:
        """Take stream ``sid``'s request (the connection then starts or wakes the
        greenlet). The first stream of a connection carries its accept and TLS times."""
        self.stream = sid
        self.req = req
        self.body.clear()
        self.event.clear()
        self.closed = None
        self.blocked = False
        self.responded = False
        self.trailers = None
        self.ended = False
        self.request_trailers = None
        self.starting = True
        conn = self.conn
        # a later stream's start: when its request was read (the connection's last read)
        self.t_accept = conn.t_accept or conn.idle_since
        self.t_tls = conn.t_tls
        conn.t_accept = 0.0
        conn.t_tls = 0.0

    def run(self) -> None:
        """The stream's greenlet: serve the request, then wait in the connection's pool
        for the next one; ends when the pool is full or the connection is over."""
        self.greenlet = getcurrent()
        conn = self.conn
        hub = get_hub()
        while True:
            self.starting = False
            if conn.over:  # handed a request as the connection ended: not served
                return
            self._serve()
            if not conn.stream_done(self):
                return
            hub.switch()  # parked: the connection switches back with the next request

    def _serve(self) -> None:
        ws = self.ws
        ws.streams.add(self)
        try:
            self._handle()
        except (ClientGone, Deadline):
            self.abandoned()
        except Exception as e:  # a bug: logged, 500 if nothing went out yet
            self._fault(e)
        finally:
            ws.streams.discard(self)
            self.deadline = 0.0
            if not self.ended:  # broke off (the upstream failed mid-body): not complete
                self.conn.session.reset(self.stream, ng.INTERNAL_ERROR)

    def _handle(self) -> None:
        ws = self.ws
        req = self.req
        ex = self.exchange
        ex.start(req, self.t_accept, self.t_tls)
        if not req.request_id:
            req.request_id = ws.new_request_id()
        if faults.REQUEST:
            faults.request_fault(self, req)
        climits = ws.client_limits
        if climits is not None and not climits.allow_request(self.remote):
            ex.reject = "rate_limited"
            ex.fail(climits.status, None, "")
            return
        upstream = ws.router.route(req.host, req.path, self.listener.default_upstream)
        ex.route = ws.router.matched
        if upstream is None:
            ex.fail(503, None, "no upstream")
            return
        if upstream.split:
            upstream = upstream.choose(req, self.remote)
        if req.grpc:
            grpc.forward(ex, upstream)
        else:
            ex.forward(upstream)

    def _fault(self, e: BaseException) -> None:
        log = self.ws.spec.logger
        if log is not None:
            try:
                log.error("request failed", request_id=self.req.request_id.decode("latin-1"),
                          remote=self.remote, method=self.req.method, stream=self.stream,
                          error=repr(e), exc_info=e)
            except Exception:
                pass
        if not self.responded:
            self.send_error(500)

    # -- waiting on the connection -----------------------------------------------------

    def _wait(self, timeout: float) -> None:
        """Sleep until the connection has news for this stream (Deadline past timeout)."""
        event = self.event
        event.clear()
        self.deadline = _monotonic() + timeout
        event.wait()

    def _queued(self) -> None:
        """Response bytes were queued: have them written, and wait while more than the
        send buffer of this stream is queued (the producer pauses its upstream)."""
        conn = self.conn
        conn.wake.set()
        session = conn.session
        limit = session.limits.send_buffer
        if session.pending(self.stream) <= limit:
            return
        send_timeout = self.ws.send_timeout
        while session.pending(self.stream) > limit:
            if self.closed is not None:
                raise ClientGone("stream closed")
            self.blocked = True
            try:
                self._wait(send_timeout)
            except Deadline:
                self._send_timed_out()
                raise ClientGone("client not reading (send_timeout)")
            finally:
                self.blocked = False

    def _send_timed_out(self) -> None:
        """Logged when a stream waited send_timeout for its queued bytes to drain (once
        per such stream, not the hot path): whether the client's window held them
        (send_window <= 0) or the connection never framed them (window open, nghttp2
        wanting to write: the connection's loop slept through the stream's wake-up)."""
        log = self.ws.spec.logger
        if log is None:
            return
        conn = self.conn
        session = conn.session
        sid = self.stream
        out = session.streams.get(sid)
        log.warning("HTTP/2 stream send timed out", remote=self.remote, stream=sid,
                    pending=session.pending(sid), send_window=session.send_window(sid),
                    want_write=session.want_write, deferred=out is not None and out.deferred,
                    connection_woken=conn.wake.is_set(), readable=conn.readable)

    # -- the exchange's front end --------------------------------------------------------

    def read_body(self):
        body = self.body
        while not body:
            if self.closed is not None:
                raise BodyAborted(400, "stream_reset")
            try:
                self._wait(self.ws.body_timeout)
            except Deadline:
                self.conn.session.reset(self.stream, ng.CANCEL)
                self.conn.wake.set()
                raise BodyAborted(408, "body_timeout")
        data = body.pop(0)
        if data is None:
            return None
        if data is BODY_TOO_LARGE:  # the session dropped the rest of it
            raise BodyAborted(413, "body_too_large")
        self.conn.session.consume(self.stream, len(data))
        self.conn.wake.set()
        return data

    def body_buffered(self) -> bool:
        return bool(self.body)

    def send_head(self, ex, first) -> None:
        framing = ex.framing
        length = ex.content_length if framing is Framing.LENGTH or (
            framing is Framing.NONE and ex.req.method == "HEAD") else None
        status = ex.status
        raw = ex.raw_head
        memo = _memo
        # an HTTP/1.1 head: its raw bytes; an HTTP/2 upstream's: its field list, which
        # the client session gives again (the same object, never changed) for a head
        # the same as the last one (forkproxy/http2/client.py)
        key = raw if raw is not None else ex.rhead.headers
        if (key is memo.raw or raw is not None and raw == memo.raw) \
                and length == memo.length and status == memo.status:
            nva, count = memo.nva, memo.count
        else:
            fields = response_fields(raw) if raw is not None else key
            nva, count, keep = nv_array(status, h2_fields(fields, length))
            memo.raw, memo.length, memo.status = key, length, status
            memo.nva, memo.count, memo.keep = nva, count, keep
        session = self.conn.session
        self.responded = True
        # all of a Content-Length body came with the head from an HTTP/1.1 upstream (no
        # trailers can follow): submitted with it, read by nghttp2 in C
        if first and length == len(first) and framing is Framing.LENGTH \
                and length <= session.limits.send_buffer and ex.conn.__class__ is not H2Stream:
            self.whole = True
            if not session.respond_whole(self.stream, nva, count, bytes(first)):
                raise ClientGone("stream closed")
            self.conn.wake.set()
            return
        self.whole = False
        # no body (a trailers-only gRPC response over HTTP/1.1 has a length of 0): the
        # HEADERS frame ends the stream
        if not session.respond_nv(self.stream, nva, count,
                                  framing is Framing.NONE or length == 0):
            raise ClientGone("stream closed")
        if first:
            session.send_data(self.stream, bytes(first))
        self._queued()

    def send_body(self, data) -> None:
        if not self.conn.session.send_data(self.stream, bytes(data)):
            raise ClientGone("stream closed")
        self._queued()

    def end_body(self) -> bool:
        self.ended = True
        if not self.whole:  # else the session has it all, and the connection was woken
            self.conn.session.end(self.stream, self.trailers)
            self.conn.wake.set()
        return True  # the connection's other streams go on whatever this one did
