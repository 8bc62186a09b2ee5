"""One request forwarded upstream, whatever protocol the client speaks.

An :class:`Exchange` picks a server, acquires a pooled connection or connects (with
retries within the upstream's budget), sends the request head and streams the body,
reads and validates the response head, relays the body by its :class:`Framing`, and
records the request context into the worker's ring. The client side is a front end
(:mod:`forkproxy.worker.front`): an HTTP/1.1 connection, or an HTTP/2 stream, reads the
request body and writes the response through it; the exchange never looks at how.

One Exchange object per front end, reused for each of its requests (:meth:`start`
resets it), so a keep-alive connection allocates no exchange per request.

Retries (see UpstreamConfig.retry_on): another server each time; after the request was
sent only if it can be replayed; never after response bytes went out. A pooled
connection the upstream had closed while idle is retried on a fresh one (not counted).
"""

from __future__ import annotations

import time

from gevent import socket

from forkproxy import tlsnames
from forkproxy.context import (
    N_TIMES,
    T_ACCEPT,
    T_CONNECT_START,
    T_CONNECTED,
    T_END,
    T_FIRST_BYTE,
    T_HEADERS,
    T_SENT,
    T_TLS,
    RequestContext,
    encoder,
)
from forkproxy.http.framing import LAST_CHUNK, Framing, frame_chunk, response_framing
from forkproxy.http.messages import IDEMPOTENT
from forkproxy.http.response import HEAD_END, BadResponse, ResponseParser, fast_head
from forkproxy.http.trailers import TrailersTooLarge, last_chunk, relayable_trailers
from forkproxy.tlsnames import TLSHandshakeFailed
from forkproxy.worker import grpc
from forkproxy.worker.failures import Upgraded, UpstreamBroken, UpstreamFailed
from forkproxy.worker.front import BodyAborted, ClientGone
from forkproxy.worker.readiness import ReadWatch
from forkproxy.worker.relay import RELAYERS
from forkproxy.worker.server import PoolTimeout
from forkproxy.worker.tracing import start_span
from forkproxy.worker.upconn import UpstreamConn

_timeout = socket.timeout
_monotonic = time.monotonic
_ZERO_TIMES = (0.0,) * N_TIMES
#: the largest upstream response head read, however it arrives
MAX_RESPONSE_HEAD = 64 * 1024


class Exchange:
    """One request's trip upstream and back; ``front`` is the client side."""

    __slots__ = ("ws", "front", "req", "times", "server", "conn", "status", "framing",
                 "raw_head", "rhead", "parser", "up_keep", "content_length", "bytes_in", "bytes_out", "retries",
                 "reject", "retry_statuses", "tunnel", "upgrade", "keep", "tries", "exclude",
                 "last", "route", "grpc_status", "expired", "get_buffer", "put_buffer")

    def __init__(self, ws, front, buffers=None):
        self.ws = ws
        self.front = front
        # where the upstream read buffer comes from: the worker's buffer_size pool, or
        # ``buffers`` (get/put), a front end's own (HTTP/2 streams: smaller buffers)
        pool = ws if buffers is None else buffers
        self.get_buffer = pool.get_buffer
        self.put_buffer = pool.put_buffer
        self.times = [0.0] * N_TIMES
        self.server = None  # the server of the try the context records
        self.conn = None  # and its connection (None: none was used)
        self.status = 0
        self.framing = Framing.NONE
        self.raw_head = None  # the head to relay, as the fast path took it
        self.rhead = None  # else the parsed head
        self.parser = None  # and its parser (a chunked body goes on through it)
        self.up_keep = False  # the upstream connection may be pooled after this response
        self.content_length = None
        self.retry_statuses = None  # upstream statuses turned into a retry, this try
        self.keep = False  # after connect() returned None: may the client connection stay
        self.tries = 0  # retries left for this request
        # set by a tunnel, which is the last request of its connection: never reset
        self.tunnel = False  # the context is a tunnel's (status 101, bytes each way)
        self.upgrade = False  # a 101 is expected: raise Upgraded instead of relaying
        # gRPC requests only (forkproxy/worker/grpc.py; cleared when one is recorded):
        self.grpc_status = -1  # the status known so far (the proxy's own, or trailers')
        self.expired = False  # the grpc-timeout deadline passed
        self.start(None, 0.0, 0.0)

    def start(self, req, t_accept: float, t_tls: float) -> None:
        """Begin a new request on this front end. Only what is read before it is
        written is reset here (per request: each store costs; the rest is set on the
        way: server and conn before any record, the head fields by _read_head)."""
        self.req = req
        times = self.times
        times[:] = _ZERO_TIMES
        times[T_ACCEPT] = t_accept
        times[T_TLS] = t_tls
        times[T_HEADERS] = _monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.retries = 0  # tries on another server (the context's retries)
        self.reject = ""  # why the proxy refused the request itself (the context's reject)
        self.exclude = None  # servers the next pick skips
        self.last = None  # (status, detail, server) of the last failed try
        self.route = ""  # the label of the route the front end matched (the context's)

    # -- the whole exchange ------------------------------------------------------------

    def forward(self, upstream) -> bool:
        """Forward the started request to ``upstream`` and relay the answer (or answer a
        failure); returns whether the client connection may carry another request."""
        req = self.req
        front = self.front
        remote = front.remote_b
        if remote is None:  # after a PROXY header, if any, named the client
            remote = front.remote_b = front.remote.encode()
        listener = front.listener
        head = upstream.make_head(req, req.request_id, remote, listener.scheme,
                                  listener.host_fallback, start_span(req, self.ws))
        budget = upstream.budget
        budget.request(self.times[T_HEADERS])
        key = upstream.keyspec.key(req, front.remote) if upstream.keyspec is not None else None
        replayable = not req.has_body and req.method in IDEMPOTENT
        self.tries = upstream.retries
        while True:
            conn = self.connect(upstream, key, req.method not in IDEMPOTENT)
            if conn is None:
                return self.keep
            server = conn.server
            rs = upstream.retry_statuses  # None unless retry_on names statuses
            self.retry_statuses = (rs if rs is not None and self.tries and replayable
                                   and budget.can(self.times[T_CONNECTED]) else None)
            try:
                # HTTP/1.1 (send_and_relay below) or HTTP/2 (h2exchange), per upstream
                return upstream.relay(self, head, conn)
            except UpstreamFailed as e:
                conn.reusable = False
                if e.retryable and replayable:
                    server.close_idle()  # the pool's connections went stale: retry fresh
                    continue
                if e.kind:
                    now = _monotonic()
                    if not self.expired:  # the client's deadline is not the server's fault
                        server.failed(now)
                    if (self.tries and replayable and e.kind in upstream.retry_kinds
                            and budget.allow(now)):
                        self._retry(server, e.status, str(e))
                        continue
                return self.fail(e.status, server, str(e))
            finally:
                server.release(conn, conn.reusable)

    def connect(self, upstream, key, check_peer: bool) -> UpstreamConn | None:
        """A connection to a server of ``upstream`` (pooled or new; connect failures
        retried on other servers while allowed), or None once the client was answered
        (``keep`` then says whether its connection stays). check_peer: a pooled
        connection is checked first (a request that must never be sent twice)."""
        times = self.times
        while True:
            server = upstream.pick(key, self.exclude)
            if server is None:
                last = self.last
                if last is not None:
                    self.keep = self.fail(last[0], last[2], last[1])
                else:
                    self.keep = self.fail(503, None, "no server available")
                return None
            times[T_CONNECT_START] = _monotonic()
            try:
                conn = server.acquire()
            except PoolTimeout as e:
                self.keep = self.fail(503, server, f"upstream queue: {e}")
                return None
            except (OSError, _timeout) as e:
                if isinstance(e, _timeout):
                    status, detail = 504, "upstream connect timeout"
                elif isinstance(e, TLSHandshakeFailed):  # the reason; never a plain-text fallback
                    status, detail = 502, e.detail
                else:
                    status, detail = 502, f"upstream connect: {e.strerror or e}"
                now = _monotonic()
                if not self.expired:
                    server.failed(now)
                if self.tries and upstream.retry_connect and upstream.budget.allow(now):
                    self._retry(server, status, detail)
                    continue
                self.keep = self.fail(status, server, detail)
                return None
            if conn.reused and check_peer and conn.closed_by_peer():
                server.release(conn, False)
                server.close_idle()
                continue
            times[T_CONNECTED] = _monotonic()
            return conn

    def _retry(self, server, status: int, detail: str) -> None:
        """Count a retry away from ``server``; the next pick skips it."""
        self.tries -= 1
        self.retries += 1
        server.retries += 1
        if self.exclude is None:
            self.exclude = [server]
        else:
            self.exclude.append(server)
        self.last = (status, detail, server)

    def fail(self, status: int, server, detail: str) -> bool:
        """Answer a failure ourselves and record it; returns the front end's keep-alive."""
        self.times[T_END] = _monotonic()
        if self.req.grpc:  # a gRPC status, never an error page
            keep, detail = grpc.answer(self, status, detail)
        else:
            keep = self.front.send_error(status)
        self.server = server
        self.conn = None
        self.record(status, 0, detail)
        return keep

    # -- one try on one connection -----------------------------------------------------

    def send_and_relay(self, head: bytes, conn: UpstreamConn) -> bool:
        """One try: send the request (head + streamed body), read the response head,
        relay the body by its framing, record; returns the front end's keep-alive."""
        req = self.req
        up = conn.sock
        send_timeout = conn.server.cfg.send_timeout
        times = self.times
        # connect() took T_CONNECTED just before: a clock read less per request
        self.front.deadline = times[T_CONNECTED] + send_timeout
        try:
            if req.has_body:
                if req.expect_continue:
                    self.front.send_continue()
                up.sendall(head)
                self.bytes_in = self._send_body(up, send_timeout)
            elif not (conn.reused and self.ws.held_sends.hold(conn, head)):
                # sent now, not held until the loop turn ends (worker/heldsends.py)
                try:  # the plain socket's send, or SSL_write (no gevent wrapper frame)
                    n = conn.send(head)
                except tlsnames.WOULD_BLOCK:
                    n = 0  # TLS: the whole head again (SSL_write retries the same bytes)
                if n != len(head):
                    up.sendall(memoryview(head)[n:])
        except BodyAborted as e:
            self.reject = e.reason
            raise UpstreamFailed(e.status, "request body failed")
        except (OSError, _timeout) as e:
            if isinstance(e, _timeout):
                raise UpstreamFailed(504, "upstream send timeout", kind="timeout")
            raise UpstreamFailed(502, f"upstream send: {e}", retryable=conn.reused, kind="reset")
        sent = times[T_SENT] = _monotonic()
        buf = self.get_buffer()
        view = memoryview(buf)
        try:  # the response, inline: one call less per request (scripts/hotpath-ab)
            self.front.deadline = sent + conn.server.head_timeout  # per_try_timeout
            head_len, n = self._read_head(conn, buf, view)
            status = self.status
            if self.retry_statuses is not None and status in self.retry_statuses:
                # retry_on names this status and a retry is possible: not relayed
                raise UpstreamFailed(status, f"upstream answered {status}", kind="status")
            rhead = self.rhead
            framing = self.framing = response_framing(
                req.method, status, self.content_length, rhead is not None and rhead.chunked)
            self.server = conn.server
            self.conn = conn
            try:
                RELAYERS[framing](self, conn, view, head_len, n)
                keep = self.front.end_body()
            except UpstreamBroken as e:
                error = str(e)
            except ClientGone:
                error = "client gone"
            else:
                conn.reusable = self.up_keep
                times[T_END] = _monotonic()
                self.record(status, self.bytes_out, "")
                return keep
            self.times[T_END] = _monotonic()
            self.record(status, self.bytes_out, error)
            return False
        finally:
            self.put_buffer(buf)

    def _send_body(self, up, send_timeout: float) -> int:
        """Copy the request body to the upstream as the front end yields it; a chunked
        request stays chunked (re-framed), a sized one is copied as is."""
        front = self.front
        read_body = front.read_body
        chunked = self.req.chunked
        total = 0
        while True:
            data = read_body()
            if data is None:
                if chunked:
                    trailers = front.request_trailers  # an HTTP/2 client's, filtered
                    up.sendall(last_chunk(trailers) if trailers else LAST_CHUNK)
                return total
            front.deadline = _monotonic() + send_timeout
            total += len(data)
            up.sendall(frame_chunk(data) if chunked else data)

    def _read_head(self, conn: UpstreamConn, buf, view) -> tuple[int, int]:
        """Read up to the end of a final response head, skipping interim ones (100,
        103). Sets status, raw_head or rhead; returns (end of head, bytes in buf)."""
        up = conn.sock
        times = self.times
        n = 0
        start = 0
        while True:
            # after an interim response the next head may be buffered already
            end = buf.find(HEAD_END, start, n) if start else -1
            if end < 0:
                try:
                    if n == 0:
                        watch = conn.watch
                        if watch is None:
                            watch = conn.watch = ReadWatch(self.ws.hub, up.fileno())
                        got = conn.recv_first(watch, view)
                    else:
                        got = up.recv_into(view[n:])
                except _timeout:
                    raise UpstreamFailed(504, "upstream read timeout", kind="timeout")
                except OSError as e:
                    raise UpstreamFailed(502, f"upstream read: {e.strerror or e}",
                                         retryable=conn.reused and n == 0, kind="reset")
                if got == 0:
                    raise UpstreamFailed(502, "upstream closed before the response",
                                         retryable=conn.reused and n == 0, kind="reset")
                if not times[T_FIRST_BYTE]:
                    times[T_FIRST_BYTE] = _monotonic()
                n += got
                end = buf.find(HEAD_END, max(start, n - got - 3), n)
                if end < 0:
                    if n >= MAX_RESPONSE_HEAD or n >= len(buf):
                        raise UpstreamFailed(502, "upstream response head too large")
                    continue
            head_len = end + 4
            fast = fast_head(bytes(view[start:head_len]))
            if fast is not None:
                self.status, self.content_length, self.up_keep, self.raw_head = fast
                self.rhead = None
                return head_len, n
            rhead = self._parse_head(view[start:head_len])
            if rhead.status == 101:
                if self.upgrade:  # the tunnel takes it from here
                    raise Upgraded(bytes(view[start:head_len]), bytes(view[head_len:n]))
                raise UpstreamFailed(502, "unexpected 101 from upstream")
            if rhead.status >= 200:
                self.status = rhead.status
                self.content_length = rhead.content_length
                self.up_keep = rhead.keep_alive
                return head_len, n
            # interim response (102, 103...): relayed; a 100 only if the proxy did not
            # already answer the client's Expect itself (it never forwards Expect)
            if rhead.status != 100 or not self.req.expect_continue:
                self.front.send_interim(rhead.status, rhead.headers)
            start = head_len

    def _parse_head(self, data):
        """The full parser's judgement of a head the fast path did not take."""
        parser = ResponseParser()
        try:
            rhead = parser.parse_head(data)
        except BadResponse as e:
            raise UpstreamFailed(502, f"bad upstream response: {e}")
        self.parser = parser
        self.rhead = rhead
        self.raw_head = None
        return rhead

    def relay_trailers(self, fields) -> None:
        """A response trailer section read after the body, from any upstream protocol:
        ``fields`` are (name, value) byte pairs with values already checked for
        controls; what may be relayed goes to the front end. Raises UpstreamBroken."""
        try:
            fields = relayable_trailers(fields)
        except TrailersTooLarge as e:
            raise UpstreamBroken(str(e))
        if fields:
            if self.req.grpc:
                grpc.trailers_status(self, fields)
            self.front.send_trailers(fields)

    def body_piece(self, piece) -> None:
        """One piece of a body the relayer does not copy itself, to the client."""
        self.bytes_out += len(piece)
        self.front.send_body(piece)

    # -- the request context -----------------------------------------------------------

    def answered(self, req, status: int, t_accept: float, error: str = "") -> None:
        """Record a request the front end answered itself (refused, malformed, fault)."""
        reject = self.reject
        self.start(req, t_accept, 0.0)
        self.reject = reject
        self.server = None
        self.conn = None
        self.tunnel = False
        times = self.times
        times[T_HEADERS] = 0.0
        times[T_END] = _monotonic()
        self.record(status, 0, error)

    def record(self, status: int, bytes_out: int, error: str) -> None:
        """Leave this request's context in the worker's ring (never blocks; the ring
        drops and counts when full)."""
        ws = self.ws
        ws.requests += 1
        front = self.front
        req = self.req
        server = self.server
        conn = self.conn
        buf = ws.encbuf  # one reused buffer: no allocation per record
        trace = req.trace  # indexed, not *req.trace: a star-call here cost ~2 us per request
        encoder.encode_into(RequestContext(
            time.time(), req.request_id.decode("latin-1"), ws.pid, front.listener.name,
            front.remote, req.method, req.path.decode("latin-1"), status, self.bytes_in,
            bytes_out, server.upstream.name if server is not None else "",
            server.address if server is not None else "",
            conn.reused if conn is not None else False, front.tls_resumed,
            front.tls_version, self.times, error, self.reject, self.retries, self.tunnel,
            front.protocol, front.stream,
            self.route, trace[0], trace[1], trace[2], trace[3], trace[4],
            grpc.recorded_status(self, status) if req.grpc else None,
        ), buf)
        ws.push_record(buf)  # never blocks: the ring drops and counts when full
        self.reject = ""
