"""The HTTP/1.1 client connection: read, parse, park, linger, dispatch, write.

A greenlet per connection (not per request). Requests are handled strictly in order,
which is what makes pipelining correct: the parser queues at most one recv buffer of
events, and the next request is only looked at once the previous response is relayed.
Each request is forwarded by the connection's :class:`~forkproxy.worker.exchange.Exchange`
(reused for every request); this module is the exchange's HTTP/1.1 front end.

Hot-path rules: no logging, no per-request allocation that can be avoided (the recv
buffer for client reads is shared by all connections of the worker because the parser
copies what it keeps before any greenlet switch), one send per response head (+ the
start of the body), and error responses are prebuilt bytes.
"""

from __future__ import annotations

import time

from gevent import getcurrent, socket

from forkproxy.http.forward import interim_head, rebuilt_response_head, trailers_only_head
from forkproxy.http.framing import CLOSE_DELIMITED_FOR_HTTP10, LAST_CHUNK, frame_chunk
from forkproxy.http.messages import CONTINUE_100, HTTPError, prebuilt_error
from forkproxy.http.request import BODY, END, ERROR, HEAD, Request, RequestParser
from forkproxy.http.trailers import last_chunk
from forkproxy.worker import faults, grpc
from forkproxy.worker.client import ClientConnection
from forkproxy.worker.exchange import Exchange
from forkproxy.worker.front import BodyAborted, ClientGone, FrontEnd
from forkproxy.worker.sockio import send_all
from forkproxy.worker.tunnel import tunnel

_timeout = socket.timeout
_monotonic = time.monotonic
#: an idle keep-alive connection keeps its greenlet this long, then is parked on a watcher
PARK_AFTER = 1.0
SWEEP_SLACK = 0.2
#: first body bytes up to this size go out in one send with the response head
JOIN_FIRST_BODY = 16384
#: _await_request's verdicts besides "a request's bytes arrived" (None)
CLOSE, PARKED = False, True


class Http1Connection(ClientConnection, FrontEnd):
    """State of one HTTP/1.1 client connection; ``serve()`` runs until it closes or
    parks. Per-connection state lives here; per-request state lives in ``exchange``."""

    __slots__ = ("parser", "closing", "body_done", "head_deadline", "req", "resp_started",
                 "exchange", "keep_next", "chunk_out")

    def __init__(self, ws, listener, sock, addr, t_accept: float):
        super().__init__(ws, listener, sock, addr, t_accept)
        self.parser = RequestParser(ws.limits)
        self.closing = False  # no further request will be read
        self.body_done = True  # the current request's body was read to its end
        # client_header_timeout bounds a whole request head (a new connection's from
        # accept); 0.0 = between requests, where keepalive_timeout applies
        self.head_deadline = t_accept + ws.header_timeout
        self.req = None  # the request being served (for the fault log)
        self.resp_started = False  # response bytes went out: a fault can no longer 500
        self.exchange = None  # made on the first request, dropped when parked
        self.keep_next = False  # the response being relayed allows another request
        self.chunk_out = False  # the response body goes to the client chunked

    # -- reading -------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        """Read once from the client into the worker's shared buffer and parse it.

        Returns False on EOF. The parser copies everything it keeps before we can
        switch greenlets, so sharing one buffer across connections is safe."""
        ws = self.ws
        try:
            n = self.recv(ws.rbuf, timeout, self.idle)
        except _timeout:
            raise HTTPError(408, "client timed out")
        if n == 0:
            return False
        self.parser.feed(ws.rview[:n])
        return True

    # -- the connection's life -------------------------------------------------------

    def serve(self) -> bool:
        """Serve requests until the connection closes; True when it was parked instead
        (idle, on a watcher without a greenlet: the worker keeps it registered)."""
        self.greenlet = getcurrent()
        try:
            return self._serve_requests()
        except HTTPError as e:
            self.ws.stats_errors += 1
            self.linger = True
            self._reply_error(e.status, True, self.req or self.parser.current(), e.kind)
        except ClientGone:
            pass
        except Exception as e:  # a bug: log it, 500 if we can, keep the worker serving
            self._fault(e)
        finally:
            if self.parked is None:
                self.idle = False
                self.close()
                # the exchange points back here (its front end): without this link the
                # closed connection is freed by reference counting instead of being
                # left as a cycle for the collector (~19 objects and ~6 µs of collection
                # per connection, docs/BENCHMARKS.md)
                self.exchange = None
        return False

    def _serve_requests(self) -> bool:
        events = self.parser.events
        while True:
            if not events:
                verdict = self._await_request()
                if verdict is not None:
                    return verdict
                continue
            kind, req = events.popleft()
            self.idle = False
            self.head_deadline = 0.0
            if kind == END:  # the end of a request without a body
                continue
            if kind != HEAD:
                if kind == ERROR:  # after the requests before it were served
                    raise req
                raise HTTPError(400, "unexpected body")  # bodies go through read_body()
            self.req = req
            self.body_done = not req.has_body
            climits = self.ws.client_limits
            if climits is not None and not climits.allow_request(self.remote):
                if not self._refuse_request(req, climits.status):
                    return CLOSE
                continue
            if not self.handle(req):
                return CLOSE
            self.resp_started = False
            self.req = None

    def _await_request(self):
        """Wait for the start of a request (idle) or the rest of its head. None: bytes
        arrived; CLOSE: EOF or nothing in time; PARKED: handed to a watcher."""
        ws = self.ws
        now = _monotonic()
        if not (self.idle or self.head_deadline or self.closing or self.parser.in_head
                or self.tls_resumed is not None):
            # the common case, a request just answered on a plain connection: idle from
            # now, for PARK_AFTER or the keep-alive timeout if shorter
            self.idle = True
            self.idle_since = now
            ka = ws.keepalive_timeout
            self.deadline = now + (PARK_AFTER if ka > PARK_AFTER else ka)
        elif self._await_deadline(ws, now):
            return CLOSE
        try:  # the read of _fill, inline: once per request (scripts/hotpath-ab)
            n = self.recv_by(ws.rbuf, self.idle)
        except _timeout:
            if self.idle:
                # only between requests: a first request keeps its whole-head deadline
                if (not self.head_deadline and self.tls_resumed is None
                        and self.idle_since + ws.keepalive_timeout - now > PARK_AFTER + SWEEP_SLACK):
                    self._park()
                    return PARKED
                return CLOSE  # nothing of a request arrived in time: just close
            raise HTTPError(408, "client timed out", kind="header_timeout")
        if n == 0:
            return CLOSE
        self.parser.feed(ws.rview[:n])
        if not self.t_accept:  # keep-alive: the request began with these bytes
            self.t_accept = _monotonic()
        return None

    def _await_deadline(self, ws, now: float) -> bool:
        """_await_request's deadline in the other cases (inside a head, a first request,
        still idle after a wake-up, TLS, closing); True: close instead of waiting."""
        if self.parser.in_head:
            self.idle = False
            if not self.head_deadline:
                self.head_deadline = now + ws.header_timeout
        elif not self.idle:
            self.idle = True
            self.idle_since = now
        if self.closing:
            return True
        d = self.head_deadline
        timeout = d - now if d else ws.keepalive_timeout
        idle_left = self.idle_since + ws.keepalive_timeout - now
        # only between requests: a first request keeps its whole-head deadline
        plain_idle = self.idle and self.tls_resumed is None and not d
        if plain_idle and idle_left > PARK_AFTER:
            timeout = PARK_AFTER
        elif plain_idle:
            timeout = idle_left
        self.deadline = now + timeout
        return False

    def _park(self) -> None:
        """Release the greenlet of a connection idle for PARK_AFTER: a greenlet parked in
        recv costs ~9 KiB, a libev read watcher ~1 KiB (docs/BENCHMARKS.md). Readable
        (a request, EOF, or the drain's shutdown) -> ws.unpark() serves it in a new
        greenlet; the deadline sweeper closes it at the keep-alive timeout."""
        ws = self.ws
        self._unwatch()
        self.greenlet = None
        self.parser = None  # at a message boundary: a new one costs ~1 us on wake-up
        self.exchange = None
        self.deadline = self.idle_since + ws.keepalive_timeout
        watcher = self.parked = ws.hub.loop.io(self.sock.fileno(), 1)
        watcher.start(ws.unpark, self)

    def unparked(self) -> None:
        """Called in the hub when a parked connection becomes readable."""
        watcher = self.parked
        self.parked = None
        self.parser = RequestParser(self.ws.limits)
        if watcher is not None:
            watcher.stop()
            watcher.close()

    # -- answers of the proxy's own ---------------------------------------------------

    def _exchange(self) -> Exchange:
        ex = self.exchange
        if ex is None:
            ex = self.exchange = Exchange(self.ws, self)
        return ex

    def _reply_error(self, status: int, close: bool, req, reject: str = "",
                     error: str = "") -> None:
        self.resp_started = True
        try:
            if self.held is not None:
                self.settle()
            send_all(self.sock, prebuilt_error(status, close))
        except ClientGone:
            pass
        if req is not None:
            if not req.request_id:
                req.request_id = self.ws.new_request_id()
            ex = self._exchange()
            ex.reject = reject
            ex.answered(req, status, self.t_accept, error)

    def _refuse_request(self, req, status: int) -> bool:
        """A request over the client's rate: answered here; keep the connection if the
        framing allows (no body to skip)."""
        keep = req.keep_alive and not req.has_body and not self.closing and not self.ws.draining
        if not keep:
            self.linger = True
        self._reply_error(status, not keep, req, "rate_limited")
        self.resp_started = False
        self.req = None
        return keep

    def refuse(self, status: int, reason: str) -> None:
        """Refuse a whole connection before reading from it (per-IP connection limit):
        answer ``status``, drain what the client sent, close."""
        self.greenlet = getcurrent()
        self.linger = True
        try:
            self._reply_error(status, True, Request(), reason)
        finally:
            self.close()

    def _fault(self, e: BaseException) -> None:
        """A bug while serving (not the client's fault, not the upstream's): logged with
        the request id; answered 500 unless response bytes already went out; the
        connection closes and the worker goes on serving the others. Not a hot path."""
        ws = self.ws
        req = self.req if self.req is not None else self.parser.current()
        if not req.request_id:
            req.request_id = ws.new_request_id()
        log = ws.spec.logger
        if log is not None:
            try:
                log.error("request failed", request_id=req.request_id.decode("latin-1"),
                          remote=self.remote, method=req.method,
                          path=req.path.decode("latin-1"), error=repr(e), exc_info=e)
            except Exception:
                pass
        if not self.resp_started:
            try:
                self._reply_error(500, True, None)
                self._exchange().answered(req, 500, self.t_accept, f"internal error: {e!r}")
            except Exception:
                pass

    # -- one request -----------------------------------------------------------------

    def handle(self, req) -> bool:
        """Forward one request and relay its response; False = close the connection."""
        ws = self.ws
        ex = self.exchange
        if ex is None:
            ex = self.exchange = Exchange(ws, self)
        ex.start(req, self.t_accept, self.t_tls)
        self.t_accept = 0.0  # the next request starts when its first bytes arrive
        self.t_tls = 0.0
        if not req.request_id:
            req.request_id = ws.new_request_id()
        if faults.REQUEST:
            faults.request_fault(self, req)
        upstream = ws.router.route(req.host, req.path, self.listener.default_upstream)
        ex.route = ws.router.matched
        if upstream is None:
            return ex.fail(503, None, "no upstream")
        if upstream.split:  # a canary split between upstreams: choose one
            upstream = upstream.choose(req, self.remote)
        if req is self.parser.upgrade_req:
            return tunnel(self, ex, upstream)
        if req.grpc:
            return grpc.forward(ex, upstream)
        return ex.forward(upstream)

    # -- the exchange's front end ------------------------------------------------------

    def read_body(self):
        events = self.parser.events
        while True:
            if not events:
                try:
                    if not self._fill(self.ws.body_timeout):
                        raise ClientGone("client closed during the request body")
                except HTTPError as e:
                    raise self._body_failed(e.status, "body_timeout")
                continue
            kind, data = events.popleft()
            if kind == BODY:
                return data
            if kind == END:
                self.body_done = True
                return None
            if kind == ERROR:  # 413/400 mid-body
                raise self._body_failed(data.status, data.kind)
            raise HTTPError(400, "request framing error")  # a HEAD before END: parser bug

    def _body_failed(self, status: int, reason: str) -> BodyAborted:
        """The request body failed: the client is told, and nothing follows on it."""
        self.closing = True
        self.linger = True
        return BodyAborted(status, reason)

    def send_continue(self) -> None:
        self.send(CONTINUE_100)

    def send_interim(self, status: int, fields) -> None:
        if self.exchange.req.version != "1.0":  # RFC 9110 section 15.2: none to HTTP/1.0
            self.send(interim_head(status, fields))

    def send_head(self, ex, first) -> None:
        req = ex.req
        client_11 = req.version != "1.0"
        framing = ex.framing
        close_delimited = framing in CLOSE_DELIMITED_FOR_HTTP10
        keep = self.keep_next = (req.keep_alive and not self.closing and not self.ws.draining
                                 and (client_11 or not close_delimited))
        self.chunk_out = client_11 and close_delimited
        head = ex.raw_head
        if head is not None:  # the upstream's head as it came, minus its Connection line
            if not keep:
                head = head[:-2] + b"Connection: close\r\n\r\n"
            elif not client_11:
                head = head[:-2] + b"Connection: keep-alive\r\n\r\n"
        else:
            head = rebuilt_response_head(ex.rhead, framing, client_11, keep)
        self.resp_started = True
        self.deadline = _monotonic() + self.ws.send_timeout
        n = len(first)
        if n < JOIN_FIRST_BODY or n == ex.content_length:
            data = head + first if n else head
            if n == ex.content_length and keep and self.ws.held_sends.hold(self, data):
                return  # the whole response, sent with the turn's others (worker/heldsends.py)
            self.send(data)
        else:
            self.send(head)
            self.send(first)

    def send_body(self, data) -> None:
        self.send(frame_chunk(data) if self.chunk_out else data)

    def send_trailers(self, fields) -> None:
        """In the last chunk when the body goes out chunked (to an HTTP/1.1 client,
        whether or not it sent ``TE: trailers``: RFC 9112 section 7.1.2 lets every
        HTTP/1.1 recipient parse them and discard what it does not use); an HTTP/1.0
        client's close-delimited body has no place for them."""
        if self.chunk_out:
            self.chunk_out = False  # end_body() sends no other last chunk
            self.send(last_chunk(fields))

    def end_body(self) -> bool:
        if self.chunk_out:
            self.send(LAST_CHUNK)
        return self.keep_next

    def send_error(self, status: int) -> bool:
        return self._answer(prebuilt_error, status)

    def send_trailers_only(self, fields) -> bool:
        return self._answer(trailers_only_head, fields)

    def _answer(self, head, what) -> bool:
        """The proxy's own answer, ``head(what, close)``; returns the keep-alive."""
        keep = self.exchange.req.keep_alive and not self.closing and self.body_done
        self.resp_started = True
        try:
            if self.held is not None:
                self.settle()
            send_all(self.sock, head(what, not keep))
        except ClientGone:
            keep = False
        return keep

    def splice_fd(self) -> int:
        if self.held is not None:  # a pipelined request's response before this one
            self.settle()
        return self.sock.fileno() if self.tls_resumed is None else -1
