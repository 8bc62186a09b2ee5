"""The connections of one server of an HTTP/2 upstream (``protocol = "h2c"`` / ``"h2"``),
in one worker: a few multiplexed connections instead of a pool of idle ones.

``acquire`` lends a stream (:class:`~forkproxy.worker.h2conn.H2Stream`) on the
connection with the most room under the server's SETTINGS_MAX_CONCURRENT_STREAMS; when
every connection is full another is opened, up to ``http2.max_connections``; past that
the request waits up to ``queue_timeout`` for a stream to end (PoolTimeout: 503).

The server's balancing, passive health and counters are the HTTP/1.1 server's
(forkproxy/worker/server.py): ``active`` counts streams in flight, ``connects`` new
connections, ``reuses`` streams on a connection that already carried one.

Liveness (``reap``, once a second): a connection with no frame from the server for
``ping_interval`` is sent a PING; one unanswered for ``ping_timeout`` is closed and
counts as a failure of the server (its streams fail over like a reset). Idle
connections close after ``keepalive_timeout``, and stop taking streams past
``max_connection_age``.
"""

from __future__ import annotations

import time
from collections import deque

from gevent import socket
from gevent.event import Event

from forkproxy.context import UpstreamGauge
from forkproxy.tls.client import TLSHandshakeFailed
from forkproxy.tls.client import shutdown as tls_shutdown
from forkproxy.worker.h2conn import PING_TIMEOUT, H2Conn, H2Stream
from forkproxy.worker.server import PoolTimeout, Server, TLSServer

_monotonic = time.monotonic


class NotHttp2(OSError):
    """The server did not answer the connection preface with HTTP/2 SETTINGS."""


class H2Pooling:
    """acquire/release/reap of :class:`Server` for HTTP/2 (mixed in before it)."""

    __slots__ = ()

    def _h2_init(self) -> None:
        self.h2conns: list[H2Conn] = []
        self.h2_opening = 0  # connections being opened
        self.h2_waiters: deque[Event] = deque()
        h2 = self.cfg.http2
        self.h2_max = h2.max_connections
        self.ping_interval = h2.ping_interval
        self.ping_timeout = h2.ping_timeout

    def acquire(self) -> H2Stream:
        """A stream on a connection with room, opening one if allowed. Raises OSError,
        socket.timeout (connect) or PoolTimeout."""
        deadline = 0.0
        while True:
            best = None
            room = 0
            for conn in self.h2conns:  # conn.capacity(), inline (one call per connection)
                if not conn.gone:
                    r = conn.max_streams - conn.active
                    if r > room:
                        best, room = conn, r
            if best is not None:
                if best.opened:
                    self.reuses += 1
                self.active += 1
                return best.lend()
            if len(self.h2conns) + self.h2_opening < self.h2_max:
                conn = self._h2_open()
                self.active += 1
                return conn.lend()
            now = _monotonic()
            if not deadline:
                deadline = now + self.cfg.queue_timeout
            elif now >= deadline:
                raise PoolTimeout(f"{self.h2_max} HTTP/2 connections full for "
                                  f"{self.cfg.queue_timeout:g}s")
            ev = Event()
            self.h2_waiters.append(ev)
            try:
                ev.wait(deadline - now)
            finally:
                try:
                    self.h2_waiters.remove(ev)
                except ValueError:
                    pass

    def _h2_open(self) -> H2Conn:
        """A new connection whose server sent its SETTINGS (within connect_timeout)."""
        self.h2_opening += 1
        try:
            sock = self._h2_socket()
            conn = H2Conn(self, sock, self.tls_ctx is not None)
            if not conn.ready.wait(self.connect_timeout):
                conn.close()
                raise socket.timeout("upstream HTTP/2 SETTINGS timeout")
            if conn.closed:
                raise NotHttp2(0, "upstream did not answer with HTTP/2 (protocol h2c/h2)")
        except BaseException:
            self.h2_wake()  # a request waiting for this connection tries again itself
            raise
        finally:
            self.h2_opening -= 1
        self.connects += 1
        self.h2conns.append(conn)
        return conn

    def release(self, stream: H2Stream, reusable: bool) -> None:
        stream.finish()
        self.active -= 1
        conn = stream.conn
        conn.active -= 1
        conn.keep(stream)
        if not conn.active:
            conn.idle_since = _monotonic()
            if self.hdown:  # down or retired (no longer swept): not kept
                conn.close()
            elif conn.gone:
                conn.wake.set()  # the writer closes it
        if reusable and self.fails:
            self.fails = 0  # a success ends the failure streak
        self.h2_wake()

    def h2_wake(self) -> None:
        """A stream ended or a connection has room: the first waiter tries again."""
        if self.h2_waiters:
            self.h2_waiters.popleft().set()

    def h2_closed(self, conn: H2Conn) -> None:
        try:
            self.h2conns.remove(conn)
        except ValueError:
            pass
        self.h2_wake()

    def close_idle(self) -> None:
        for conn in list(self.h2conns):
            if not conn.active:
                conn.close()

    def reap(self, now: float) -> None:
        """Idle and aged connections; PINGs for liveness (see the module's text)."""
        for conn in list(self.h2conns):
            if conn.ping_at and now - conn.ping_at > self.ping_timeout:
                if not conn.active:  # else each stream's exchange counts its failure
                    self.failed(now)
                conn.close("PING timeout", PING_TIMEOUT)
                continue
            if not conn.active and (now - conn.idle_since >= self.keepalive_timeout
                                    or conn.gone):
                conn.close()
                continue
            if self.max_age and now - conn.created >= self.max_age:
                conn.gone = True  # no new streams; closed once idle
            if not conn.ping_at and now - conn.last_seen >= self.ping_interval:
                conn.ping(now)

    def gauge(self) -> UpstreamGauge:
        g = super().gauge()
        g.idle = sum(1 for c in self.h2conns if not c.active)
        return g


class H2Server(H2Pooling, Server):
    """A server of an ``h2c`` upstream (HTTP/2 with prior knowledge over TCP)."""

    __slots__ = ("h2conns", "h2_opening", "h2_waiters", "h2_max", "ping_interval",
                 "ping_timeout", "tls_ctx")

    def __init__(self, upstream, address: str, weight: int, cfg):
        super().__init__(upstream, address, weight, cfg)
        self.tls_ctx = None
        self._h2_init()

    def _h2_socket(self):
        sock = self._open()
        self.active -= 1  # _open counts a connection; streams are counted here
        return sock


class H2TLSServer(H2Pooling, TLSServer):
    """A server of an ``h2`` upstream: TLS, with h2 agreed through ALPN."""

    __slots__ = ("h2conns", "h2_opening", "h2_waiters", "h2_max", "ping_interval",
                 "ping_timeout")

    def __init__(self, upstream, address: str, weight: int, cfg, tls_ctx, dns_name: str = ""):
        super().__init__(upstream, address, weight, cfg, tls_ctx, dns_name)
        self._h2_init()

    def _h2_socket(self):
        ssock = self._tls_socket()
        self.active -= 1
        if ssock.selected_alpn_protocol() != "h2":
            tls_shutdown(ssock)
            raise TLSHandshakeFailed("upstream TLS: the server did not agree to h2 through ALPN")
        return ssock

    def release(self, stream: H2Stream, reusable: bool) -> None:
        conn = stream.conn
        if reusable and conn.opened == 1 and self.cfg.tls.session_reuse and not conn.closed:
            # after a whole response: TLS 1.3 tickets arrive after the handshake
            session = conn.sock.session
            if session is not None and (session.has_ticket or session.id):
                self.tls_session = session
        H2Pooling.release(self, stream, reusable)
