"""One multiplexed HTTP/2 connection to an upstream server, and the streams on it.

A connection is two greenlets around a sans-IO :class:`~forkproxy.http2.client.ClientSession`:
the reader feeds what the socket brings to the session and hands its events to the
streams; the writer sleeps on ``wake`` and writes what the session framed (set by the
reader and by any stream that queued a request, body bytes or gave back window).
Sessions are only called from greenlets of one hub, never at once.

Each request is an :class:`H2Stream`, the "connection" the exchange holds for one try
(forkproxy/worker/h2exchange.py): it carries the stream's events (head, body pieces,
trailers, end, close) to the exchange's greenlet. The pool (forkproxy/worker/h2pool.py)
decides which connection a request goes to.

GOAWAY: the connection takes no new stream (``gone``); streams above its last stream id
were not processed, are closed with REFUSED_STREAM by nghttp2 and retried by the
exchange; the others finish, and the connection closes when the last one is released.
"""

from __future__ import annotations

import time
from collections import deque

import gevent
from gevent import getcurrent
from gevent.event import Event

from forkproxy.http2 import client as h2c
from forkproxy.tls.client import shutdown as tls_shutdown

_monotonic = time.monotonic
#: the stream's close code when its connection ended under it (not HTTP/2 error codes)
CONN_LOST = -1
#: ... when the connection was closed because a PING went unanswered
PING_TIMEOUT = -2
#: bytes of a request body queued in the session, per stream, before its producer waits
SEND_BUFFER = 64 * 1024
#: released streams a connection keeps to lend again (at most the streams it had at once)
STREAMS_KEPT = 128
#: the session's per-stream events are the kinds up to CLOSED (see _dispatch)
_CLOSED = h2c.CLOSED
assert max(h2c.INTERIM, h2c.HEAD, h2c.DATA, h2c.TRAILERS, h2c.END) < _CLOSED < min(
    h2c.GOAWAY, h2c.SETTINGS, h2c.PONG)
_SETTINGS, _PONG, _GOAWAY = h2c.SETTINGS, h2c.PONG, h2c.GOAWAY


class H2Stream:
    """One request on an HTTP/2 upstream connection (what the exchange holds as ``conn``)."""

    __slots__ = ("conn", "server", "sid", "items", "event", "reused", "reusable", "blocked",
                 "closed", "pumped")

    def __init__(self, conn: H2Conn):
        self.conn = conn
        self.server = conn.server
        self.items: deque = deque()  # (kind, payload) from the session, in order
        self.event = Event()

    def begin(self, reused: bool) -> None:
        """Start a request (a new object, or one the connection kept: see H2Conn.lend)."""
        self.sid = 0  # until submitted
        self.items.clear()
        self.event.clear()
        self.reused = reused  # the connection carried a stream before this one
        self.reusable = False  # the exchange's verdict (unused: the connection stays)
        self.blocked = False  # waiting for its queued body bytes to drain
        self.closed = False  # CLOSED seen
        self.pumped = False  # a pump greenlet sends its body (it may outlive the stream)

    def closed_by_peer(self) -> bool:
        """The pool never lends a stream on a connection that went away."""
        return False

    def submit(self, fields, end_stream: bool) -> bool:
        """Send the request head; False if the connection cannot take it any more."""
        conn = self.conn
        if conn.closed:
            return False
        sid = conn.session.request(fields, end_stream)
        if sid <= 0:
            return False
        self.sid = sid
        conn.streams[sid] = self
        conn.flush()
        return True

    def queue(self, data) -> bool:
        """Queue request body bytes without waiting. False: the stream is gone."""
        conn = self.conn
        if self.closed or not conn.session.send_data(self.sid, bytes(data)):
            return False
        conn.flush()
        return True

    def send(self, data, timeout: float) -> bool:
        """Queue request body bytes; wait while more than SEND_BUFFER of them are
        queued (the upstream's window is closed). False: the stream is gone."""
        if not self.queue(data):
            return False
        conn = self.conn
        session = conn.session
        while session.pending(self.sid) > SEND_BUFFER:
            if self.closed:
                return False
            self.blocked = True
            conn.nblocked += 1
            try:
                self.event.clear()
                if not self.event.wait(timeout):
                    raise gevent.socket.timeout("upstream window closed (send_timeout)")
            finally:
                self.blocked = False
                conn.nblocked -= 1
        return True

    def end(self, trailers=None) -> None:
        """The request body is complete; ``trailers``: fields sent after it."""
        if not self.closed:
            self.conn.session.end(self.sid, trailers)
            self.conn.flush()

    def next_item(self, front, timeout: float):
        """The stream's next (kind, payload). The wait is bounded by the front end's
        deadline (the worker's sweeper throws Deadline, a socket.timeout, past it): no
        timer per wait."""
        items = self.items
        if not items:
            front.deadline = _monotonic() + timeout
            event = self.event
            while not items:
                event.clear()
                event.wait()
        return items.popleft()

    def cancel(self) -> None:
        """Reset the stream (CANCEL) if it is still open: its request failed."""
        conn = self.conn
        if self.sid in conn.streams and not self.closed:
            conn.session.reset(self.sid)  # CANCEL
            conn.wake.set()

    def consume(self, n: int) -> None:
        """n response body bytes went to the client: the upstream may send more."""
        conn = self.conn
        if not conn.closed:
            session = conn.session
            session.consume(self.sid, n)
            if session.want_write:  # a WINDOW_UPDATE was due: most often none is
                conn.wake.set()

    def finish(self) -> None:
        """The exchange is done with the stream: reset it if it is still open."""
        conn = self.conn
        if self.sid and conn.streams.pop(self.sid, None) is not None and not self.closed:
            conn.session.reset(self.sid)
            conn.wake.set()


class H2Conn:
    """One HTTP/2 connection to a server of an ``h2c`` / ``h2`` upstream."""

    __slots__ = ("server", "sock", "session", "streams", "active", "wake", "ready", "gone",
                 "closed", "opened", "created", "idle_since", "last_seen", "ping_at",
                 "reader", "writer", "tls", "nblocked", "max_streams", "kept")

    def __init__(self, server, sock, tls: bool):
        self.server = server
        self.sock = sock
        self.tls = tls
        self.nblocked = 0  # streams waiting for their queued body to drain
        self.max_streams = 0  # the server's SETTINGS_MAX_CONCURRENT_STREAMS, once known
        self.session = h2c.ClientSession()
        self.streams: dict[int, H2Stream] = {}
        self.active = 0  # streams lent (submitted or about to be)
        self.wake = Event()
        self.ready = Event()  # the server's SETTINGS arrived
        self.gone = False  # GOAWAY received (or closing): no new streams
        self.closed = False
        self.opened = 0  # streams lent over its life
        self.created = self.idle_since = self.last_seen = _monotonic()
        self.ping_at = 0.0  # when the PING not yet answered went out (0: none)
        self.kept: list[H2Stream] = []  # released streams, lent again (see lend)
        self.wake.set()  # the preface and SETTINGS
        self.reader = gevent.spawn(self._read_loop)
        self.writer = gevent.spawn(self._write_loop)

    def capacity(self) -> int:
        """Streams it can still take (the server's SETTINGS_MAX_CONCURRENT_STREAMS)."""
        if self.gone:
            return 0
        return self.max_streams - self.active

    def lend(self) -> H2Stream:
        """A stream for one request: one the connection kept if it has one (an object, a
        deque and an Event less per request, and fewer objects for the cyclic garbage
        collector to walk), else a new one."""
        kept = self.kept
        stream = kept.pop() if kept else H2Stream(self)
        stream.begin(self.opened > 0)
        self.opened += 1
        self.active += 1
        return stream

    def keep(self, stream: H2Stream) -> None:
        """A released stream, to be lent again; not one whose pump greenlet may still
        run (killed, not yet gone) and touch it, nor past STREAMS_KEPT."""
        if not stream.pumped and len(self.kept) < STREAMS_KEPT:
            stream.items.clear()  # no payload held until the next request
            self.kept.append(stream)

    def _read_loop(self) -> None:
        buf = bytearray(64 * 1024)
        view = memoryview(buf)
        session = self.session
        why = "upstream closed the connection"
        try:
            while True:
                n = self.sock.recv_into(buf)
                if n == 0:
                    break
                self.last_seen = _monotonic()
                session.receive(view[:n])
                self._dispatch()
                # SETTINGS and PING ACKs, WINDOW_UPDATEs, deferred bodies: the writer
                # woken only when there are some (most reads bring responses only)
                if session.want_write:
                    self.wake.set()
                if session.failed is not None:
                    why = f"upstream HTTP/2 error: {session.failed}"
                    break
        except OSError as e:
            why = f"upstream read: {e}"
        except gevent.GreenletExit:
            return
        except Exception as e:  # a bug: the connection ends, its streams fail over
            why = f"upstream HTTP/2 connection failed: {e!r}"
        self.close(why)

    def flush(self) -> None:
        """Have what the session framed sent. Always by the writer: it sends the frames
        of every stream that queued some since it last ran in one write (measured: 15 to
        30% less worker CPU per request than sending from each stream's greenlet)."""
        self.wake.set()

    def _write_loop(self) -> None:
        session = self.session
        wake = self.wake
        sock = self.sock
        # plain text: one direct send, gevent's sendall only for what the kernel left
        raw = None if self.tls else getattr(sock, "_sock", None)
        try:
            while True:
                wake.wait()
                wake.clear()
                data = session.data_to_send()
                if data:
                    n = 0
                    if raw is not None:
                        try:
                            n = raw.send(data)
                        except BlockingIOError:
                            pass
                    if n < len(data):
                        sock.sendall(memoryview(data)[n:])
                if self.nblocked:
                    self._wake_blocked()
                if self.gone and not self.active:
                    break  # after GOAWAY, once its last stream was released
        except gevent.GreenletExit:
            return
        except Exception:  # OSError: the reader sees the connection end too; else a bug
            pass
        self.close("connection done")

    def _wake_blocked(self) -> None:
        """Streams whose queued request body drained below SEND_BUFFER go on."""
        pending = self.session.pending
        for stream in self.streams.values():
            if stream.blocked and pending(stream.sid) <= SEND_BUFFER:
                stream.event.set()

    def _dispatch(self) -> None:
        events = self.session.events
        streams = self.streams
        popleft = events.popleft
        while events:
            kind, sid, payload = popleft()
            if kind <= _CLOSED:  # a stream's
                stream = streams.get(sid)
                if stream is not None:
                    if kind == _CLOSED:
                        stream.closed = True
                    stream.items.append((kind, payload))
                    stream.event.set()
            elif kind == _SETTINGS:
                self.max_streams = self.session.max_streams
                self.ready.set()
                self.server.h2_wake()  # more streams may fit now
            elif kind == _PONG:
                self.ping_at = 0.0
            elif kind == _GOAWAY:
                self.gone = True  # streams above its last id are CLOSED REFUSED_STREAM

    def ping(self, now: float) -> None:
        self.ping_at = now
        self.session.ping()
        self.wake.set()

    def close(self, why: str = "", code: int = CONN_LOST) -> None:
        """End the connection now: every stream still on it is CLOSED with ``code``."""
        if self.closed:
            return
        self.closed = True
        self.gone = True
        self.ready.set()
        for stream in self.streams.values():
            stream.closed = True
            stream.items.append((h2c.CLOSED, code))
            stream.event.set()
        self.streams.clear()
        self.kept.clear()
        me = getcurrent()
        for g in (self.reader, self.writer):
            if g is not me and not g.dead:
                g.kill(block=False)
        self.session.close()
        if self.tls:
            tls_shutdown(self.sock)
        else:
            try:
                self.sock.close()
            except OSError:
                pass
        self.server.h2_closed(self)
