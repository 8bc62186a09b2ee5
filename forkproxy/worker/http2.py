"""The HTTP/2 client connection: one greenlet reads and writes the socket and drives the
sans-IO session (forkproxy/http2/session.py); each stream is a front end
(:mod:`forkproxy.worker.front`) that drives one :class:`~forkproxy.worker.exchange.Exchange`
in its own greenlet, against the same upstream pools, retries, limits and ring as
HTTP/1.1.

The connection greenlet sleeps on one event, set by the socket's read watcher and by
any stream that queued output or consumed request body; it then reads what the socket
has, hands the session's events to the streams, and writes what the session framed.
Streams never touch the socket: they queue response bytes in the session and wait while
more than ``send_buffer`` bytes of theirs are queued (the client's window is closed or
its connection slow), so reading from their upstream pauses and memory stays bounded.

Lifecycle: idle (no stream) for keepalive_timeout: GOAWAY and close. Worker drain (QUIT,
HUP's old generation, upgrade): GOAWAY(2^31-1) and a PING at once, the final GOAWAY with
the last stream id when the PING's ACK is back; in-flight streams finish; then the
connection closes.
"""

from __future__ import annotations

import time
from ssl import SSLEOFError, SSLWantReadError, SSLWantWriteError, SSLZeroReturnError

import gevent
from gevent import getcurrent
from gevent.event import Event

from forkproxy.http.forward import response_fields
from forkproxy.http.framing import Framing
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.session import CLOSED, DATA, END, GOAWAY, REQUEST, ServerSession
from forkproxy.http2.translate import response_fields as h2_fields
from forkproxy.worker import faults, grpc
from forkproxy.worker.client import _GONE, ClientConnection
from forkproxy.worker.exchange import Exchange
from forkproxy.worker.front import BodyAborted, ClientGone, Deadline
from forkproxy.worker.http2front import Http2FrontEnd

_monotonic = time.monotonic
#: the client connection preface (RFC 9113 section 3.4): what h2c prior knowledge begins with
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: the final GOAWAY of a graceful close follows the first once the client acknowledged
#: the PING sent with it (streams it opened before seeing the first GOAWAY have then all
#: arrived and are served), or after this long if it never does
GOAWAY_GRACE = 2.0
#: socket reads per wake-up before the connection writes and yields (fairness)
READS_PER_WAKE = 16


class Http2Connection(ClientConnection):
    """One HTTP/2 client connection (h2 over TLS, or h2c with prior knowledge)."""

    __slots__ = ("session", "streams", "wake", "watcher", "readable", "notice_at",
                 "final_sent", "client_gone_away", "early")

    @classmethod
    def adopt(cls, conn: ClientConnection, early: bytes = b"") -> Http2Connection:
        """Take over an accepted connection once its protocol is known to be HTTP/2
        (ALPN h2, or the h2c preface); ``early``: bytes already read from it."""
        self = cls.__new__(cls)
        for name in ClientConnection.__slots__:
            setattr(self, name, getattr(conn, name))
        self.session = None
        self.streams: dict[int, Http2Stream] = {}
        self.wake = Event()
        self.watcher = None
        self.readable = True  # the socket may have bytes (set by its read watcher)
        self.notice_at = 0.0  # when the first GOAWAY of a graceful close went out
        self.final_sent = False
        self.client_gone_away = False
        self.early = early
        return self

    def _on_readable(self) -> None:
        """libev callback, in the hub: the socket has bytes."""
        self.readable = True
        self.wake.set()

    def start_drain(self) -> None:
        """The worker stops: the connection's loop sends GOAWAY on its next turn."""
        self.wake.set()

    # -- the connection's life -------------------------------------------------------

    def serve(self) -> bool:
        """Serve streams until the connection closes (never parked: returns False)."""
        ws = self.ws
        self.greenlet = getcurrent()
        self.idle = False  # the drain sends GOAWAY instead of shutting it down
        ws.h2_connections += 1
        session = self.session = ServerSession(ws.h2limits, ws.limits)
        try:
            self.watcher = ws.hub.loop.io(self.sock.fileno(), 1)
            self.watcher.start(self._on_readable)
            if self.early:
                session.receive(self.early)
                self.early = b""
                self._dispatch()
            self._loop()
        except (ClientGone, Deadline):
            pass
        except Exception as e:  # a bug: logged; the worker goes on serving the others
            self._fault(e)
        finally:
            self._end()
        return False

    def _loop(self) -> None:
        session = self.session
        wake = self.wake
        ws = self.ws
        while True:
            self._flush()
            if session.failed is not None or session.finished:
                return
            # a stream stays open in the session until its response is all sent (a
            # closed client window can hold its last bytes after the exchange ended)
            busy = self.streams or session.streams
            if (self.final_sent or self.client_gone_away) and not busy:
                return
            if ws.draining and not self.final_sent:
                self._goaway_step()
            if self.notice_at and not self.final_sent:
                self.deadline = self.notice_at + GOAWAY_GRACE
            elif not busy:
                self.deadline = self.idle_since + ws.keepalive_timeout
            else:
                self.deadline = 0.0
            wake.clear()
            got = self._read()
            if got is None:
                return
            if not got and not wake.is_set():  # nothing read, nothing new: sleep
                try:
                    wake.wait()
                except Deadline:
                    if not self._timed_out():
                        return

    def _timed_out(self) -> bool:
        """The deadline passed while waiting: the second GOAWAY of a drain is due (go on,
        True), or the connection was idle too long (GOAWAY, then close: False)."""
        if self.notice_at and not self.final_sent:
            self._goaway_step()
            return True
        self.session.goaway()
        self._flush()
        return False

    def _goaway_step(self) -> None:
        now = _monotonic()
        if not self.notice_at:
            self.notice_at = now
            self.session.shutdown_notice()
        elif self.session.notice_acked or now >= self.notice_at + GOAWAY_GRACE:
            # not sooner, even when idle: requests the client sent before it saw the
            # first GOAWAY may still be on the way, and the final one refuses them
            self.final_sent = True
            self.session.goaway()

    def _read(self) -> bool | None:
        """Read what the socket has (up to READS_PER_WAKE times) into the session and
        hand the events out. True: bytes were read (answers may be due); None: the
        client closed the connection."""
        ws = self.ws
        session = self.session
        raw = self.raw
        sslobj = self.sslobj
        buf = ws.rbuf
        view = ws.rview
        size = len(buf)
        if not session.want_read:  # after GOAWAY: only the streams' answers remain
            if self.watcher is not None:
                self.watcher.stop()
            return False
        # woken by a stream, not by the socket: no read (it would only say EAGAIN)
        if not self.readable and (sslobj is None or not sslobj.pending()):
            return False
        got = False
        for _ in range(READS_PER_WAKE):
            try:
                n = raw.recv_into(buf) if raw is not None else sslobj.read(size, buf)
            except (BlockingIOError, SSLWantReadError, SSLWantWriteError):
                self.readable = False
                return got
            except (SSLEOFError, SSLZeroReturnError):
                return None
            except OSError as e:
                if e.errno in _GONE:
                    return None
                raise
            if n == 0:
                return None
            got = True
            self.idle_since = _monotonic()
            session.receive(view[:n])
            self._dispatch()
            if not session.want_read:
                break
        return got

    def _dispatch(self) -> None:
        session = self.session
        events = session.events
        streams = self.streams
        while events:
            kind, sid, payload = events.popleft()
            if kind == REQUEST:
                stream = streams[sid] = Http2Stream(self, sid, payload)
                gevent.spawn(stream.run)
                continue
            stream = streams.get(sid)
            if kind == DATA:
                if stream is None:
                    session.consume(sid, len(payload))
                    continue
                stream.body.append(payload)
            elif kind == END:
                if stream is None:
                    continue
                stream.request_trailers = payload  # None, or the checked trailer fields
                stream.body.append(None)
            elif kind == CLOSED:
                if stream is None:
                    continue
                stream.closed = payload  # the error code (0: it completed)
            elif kind == GOAWAY:
                self.client_gone_away = True
                continue
            stream.event.set()
        if session.stream_errors:
            self.ws.count_http2_errors(session.stream_errors)

    def _flush(self) -> None:
        """Write what the session has framed; then wake the streams waiting for room."""
        session = self.session
        data = session.data_to_send()
        if data:
            self.deadline = _monotonic() + self.ws.send_timeout
            self.send(data)
            self.deadline = 0.0
        limit = session.limits.send_buffer
        for stream in self.streams.values():
            if stream.blocked and (session.pending(stream.stream) <= limit
                                   or stream.closed is not None):
                stream.event.set()

    def _end(self) -> None:
        """The connection is over: every stream still running is told, all is closed."""
        ws = self.ws
        for stream in list(self.streams.values()):
            g = stream.greenlet
            if g is not None and not g.dead:
                g.kill(ClientGone("connection closed"), block=False)
        self.streams.clear()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None
        session = self.session
        if session is not None:
            ws.count_http2_errors(session.stream_errors)
            session.close()
        ws.h2_connections -= 1
        self.deadline = 0.0
        self.close()

    def _fault(self, e: BaseException) -> None:
        log = self.ws.spec.logger
        if log is not None:
            try:
                log.error("HTTP/2 connection failed", remote=self.remote, error=repr(e),
                          exc_info=e)
            except Exception:
                pass

    def stream_done(self, stream: Http2Stream) -> None:
        """A stream's greenlet ended (its exchange is over)."""
        if self.streams.get(stream.stream) is stream:
            del self.streams[stream.stream]
        self.idle_since = _monotonic()
        self.wake.set()


class Http2Stream(Http2FrontEnd):
    """One request of an HTTP/2 connection: the front end of its exchange."""

    __slots__ = ("conn", "ws", "listener", "remote", "remote_b", "tls_resumed",
                 "tls_version", "deadline", "greenlet", "parked", "stream", "req", "body",
                 "event", "closed", "blocked", "responded", "t_accept", "t_tls",
                 "trailers", "request_trailers", "ended", "exchange")

    def __init__(self, conn: Http2Connection, sid: int, req):
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
        self.stream = sid
        self.req = req
        self.body: list = []  # request body pieces from the connection; None = the end
        self.event = Event()
        self.closed = None  # the stream's close code once the session closed it
        self.blocked = False  # waiting for its queued response bytes to drain
        self.responded = False
        self.trailers = None  # response trailers for end_body()
        self.ended = False  # the response is complete (end_body or send_error)
        self.exchange = None
        self.request_trailers = None
        # the first stream of a connection carries its accept and TLS times
        self.t_accept = conn.t_accept or _monotonic()
        self.t_tls = conn.t_tls
        conn.t_accept = 0.0
        conn.t_tls = 0.0

    def run(self) -> None:
        ws = self.ws
        self.greenlet = getcurrent()
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
            self.conn.stream_done(self)

    def _handle(self) -> None:
        ws = self.ws
        req = self.req
        ex = self.exchange = Exchange(ws, self)
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
        send_timeout = self.ws.send_timeout
        while session.pending(self.stream) > limit:
            if self.closed is not None:
                raise ClientGone("stream closed")
            self.blocked = True
            try:
                self._wait(send_timeout)
            except Deadline:
                raise ClientGone("client not reading (send_timeout)")
            finally:
                self.blocked = False

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
        self.conn.session.consume(self.stream, len(data))
        self.conn.wake.set()
        return data

    def send_head(self, ex, first) -> None:
        fields = response_fields(ex.raw_head) if ex.raw_head is not None else ex.rhead.headers
        framing = ex.framing
        length = ex.content_length if framing is Framing.LENGTH or (
            framing is Framing.NONE and ex.req.method == "HEAD") else None
        session = self.conn.session
        self.responded = True
        # no body (a trailers-only gRPC response over HTTP/1.1 has a length of 0): the
        # HEADERS frame ends the stream
        if not session.respond(self.stream, ex.status, h2_fields(fields, length),
                               end_stream=framing is Framing.NONE or length == 0):
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
        self.conn.session.end(self.stream, self.trailers)
        self.conn.wake.set()
        return True  # the connection's other streams go on whatever this one did
