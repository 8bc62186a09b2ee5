"""One upstream server in one worker: its keep-alive pool (acquire, release, reap), its
passive health, and, for upstreams with ``tls``, the TLS handshake and the session kept
for the next connection (:class:`TLSServer`). Grouped, balanced and refreshed by
:class:`forkproxy.worker.upstream.Upstream`; the pool tiers and states are described
there.
"""

from __future__ import annotations

import ipaddress
import socket as pysocket
import time
from collections import deque
from errno import EINPROGRESS
from os import strerror

from gevent import socket
from gevent.event import Event

from forkproxy.config import UpstreamConfig, parse_hostport
from forkproxy.context import WEIGHT_SCALE, UpstreamGauge
from forkproxy.hashing import hash64
from forkproxy.tls.client import handshake, server_name
from forkproxy.worker.balancer import Peer
from forkproxy.worker.readiness import wait_writable
from forkproxy.worker.upconn import TLSUpstreamConn, UpstreamConn

_monotonic = time.monotonic


class PoolTimeout(Exception):
    """max_connections were all lent for queue_timeout: no connection for this request."""


class Server(Peer):
    """One upstream server with its idle pool, health and balancing state."""

    __slots__ = ("upstream", "host", "port", "address", "idle", "cfg", "family", "sockaddr",
                 "sockopts",
                 "connect_timeout", "head_timeout", "keepalive_timeout", "max_age",
                 "max_conns", "waiters", "connects", "reuses", "failures", "fails",
                 "fail_start", "ejected_until", "ejections", "retries", "hidx", "hkey", "hdown",
                 "hsince", "ramp_start", "tunnels")

    def __init__(self, upstream, address: str, weight: int, cfg: UpstreamConfig):
        super().__init__(weight, hash64(address.encode(), b"fp-peer"))
        self.upstream = upstream
        self.host, self.port = parse_hostport(address)
        self.address = address
        self.family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        #: (host, port) when the host is an IP address: connected without gevent's
        #: resolver; None for a name (resolved by gevent at each connect)
        self.sockaddr = (self.host, self.port) if _is_ip(self.host) else None
        self.sockopts = _socket_options(cfg)
        self.cfg = cfg
        per_try = cfg.per_try_timeout
        self.connect_timeout = min(cfg.connect_timeout, per_try) if per_try else cfg.connect_timeout
        self.head_timeout = min(cfg.read_timeout, per_try) if per_try else cfg.read_timeout
        self.keepalive_timeout = cfg.keepalive_timeout
        self.max_age = cfg.max_connection_age
        self.max_conns = cfg.max_connections
        self.idle: list[UpstreamConn] = []
        self.waiters: deque[Event] = deque()
        self.connects = 0
        self.reuses = 0
        self.failures = 0  # failed tries (connect, reset, timeout, retried status)
        self.fails = 0  # failures in the current fail_timeout window
        self.fail_start = 0.0
        self.ejected_until = 0.0
        self.ejections = 0
        self.retries = 0  # requests retried elsewhere after failing here
        self.hidx = -1  # entry in the shared health table (-1: no active check)
        self.hkey = 0  # the entry's KEY word while it is this server's
        self.hdown = False
        self.hsince = 0.0  # when the active check last saw it come back up
        self.ramp_start = 0.0  # slow start since (monotonic), 0 = not ramping
        self.tunnels = 0

    # -- the pool ------------------------------------------------------------------------

    def _take_idle(self, now: float) -> UpstreamConn | None:
        """The most recent pooled connection still within keepalive_timeout and
        max_connection_age (older ones are closed on the way), lent out."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.keepalive_timeout and (
                    not self.max_age or now - conn.created < self.max_age):
                conn.reused = True
                conn.reusable = False
                self.active += 1
                self.reuses += 1
                return conn
            conn.close()
        return None

    def acquire(self) -> UpstreamConn:
        """A pooled idle connection if a fresh one is there, else a new connection.

        Raises OSError (refused, unreachable), socket.timeout (connect timeout) or
        PoolTimeout (max_connections lent for queue_timeout)."""
        now = _monotonic()
        conn = self._take_idle(now)
        if conn is not None:
            return conn
        if self.max_conns and self.active >= self.max_conns:
            conn = self._wait(now)
            if conn is not None:
                return conn
        return self._connect()

    def _connect(self) -> UpstreamConn:
        sock = self._open()
        self.connects += 1
        return UpstreamConn(sock, self)

    def _open(self):
        """A connected TCP socket (TCP_NODELAY, keep-alive probes), counted in active.

        The options are set before connecting (the socket inherits them), straight on
        the plain socket, and the connect is one non-blocking connect_ex and one wait
        for writable under a timer: gevent's connect adds a getsockopt, a Timeout
        exception object and a Waiter per connection, which a worker that opens
        connections under load pays each time (docs/BENCHMARKS.md)."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        self.active += 1  # counted while connecting: max_connections holds across the wait
        try:
            raw = sock._sock
            for level, option, value in self.sockopts:
                raw.setsockopt(level, option, value)
            if self.sockaddr is None:  # a host name: gevent resolves it
                sock.settimeout(self.connect_timeout)
                sock.connect((self.host, self.port))
                sock.settimeout(None)  # later steps are bounded by the connection's deadline
                return sock
            err = raw.connect_ex(self.sockaddr)
            if err == EINPROGRESS:
                if not wait_writable(sock, self.connect_timeout):
                    raise socket.timeout("timed out")
                err = raw.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ERROR)
            if err:
                raise OSError(err, strerror(err))
        except BaseException:
            sock.close()
            self._not_connected()
            raise
        return sock

    def _not_connected(self) -> None:
        self.active -= 1
        if self.waiters:
            self.waiters.popleft().set()

    def _wait(self, now: float) -> UpstreamConn | None:
        """Queue for a connection (all max_connections lent); None = a slot is free."""
        deadline = now + self.cfg.queue_timeout
        while True:
            ev = Event()
            self.waiters.append(ev)
            try:
                woke = ev.wait(max(0.0, deadline - _monotonic()))
            finally:
                try:
                    self.waiters.remove(ev)
                except ValueError:
                    pass  # release() took it
            conn = self._take_idle(_monotonic())
            if conn is not None:
                return conn
            if self.active < self.max_conns:
                return None
            if not woke or now >= deadline:
                raise PoolTimeout(f"{self.max_conns} connections in use for "
                                  f"{self.cfg.queue_timeout:g}s")

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """Return a connection after an exchange; it is pooled only if fully clean."""
        self.active -= 1
        conn.requests += 1
        cfg = self.cfg
        if (reusable and conn.requests < cfg.keepalive_requests and len(self.idle) < cfg.keepalive
                and not self.hdown):
            now = _monotonic()
            if not self.max_age or now - conn.created < self.max_age:
                conn.idle_since = now
                self.idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        if reusable and self.fails:
            self.fails = 0  # a success ends the failure streak
        if self.waiters:
            self.waiters.popleft().set()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()

    def reap(self, now: float) -> None:
        """Close idle connections past keepalive_timeout or max_connection_age."""
        idle = self.idle
        if not idle:
            return
        keep = [c for c in idle if now - c.idle_since < self.keepalive_timeout
                and (not self.max_age or now - c.created < self.max_age)]
        if len(keep) != len(idle):
            for c in idle:
                if c not in keep:
                    c.close()
            idle[:] = keep

    # -- health --------------------------------------------------------------------------

    def failed(self, now: float) -> None:
        """A try failed on this server (passive health: may eject it in this worker)."""
        self.failures += 1
        up = self.upstream
        if not up.max_fails or up.single:
            return
        if now - self.fail_start > up.fail_timeout:
            self.fail_start = now
            self.fails = 0
        self.fails += 1
        if self.fails >= up.max_fails:
            self.fails = 0
            self.ejected_until = now + up.fail_timeout
            self.ejections += 1
            self.usable = False
            up.watch = True  # refresh() ends the ejection
            self.close_idle()

    def retire(self) -> None:
        """DNS no longer lists it: no new requests; the exchanges in flight finish, and
        release() closes their connections instead of pooling them (hdown)."""
        self.usable = False
        self.hdown = True
        self.close_idle()

    def state_name(self, now: float) -> str:
        if self.hdown:
            return "down"
        if self.ejected_until:
            return "ejected"
        if self.eff_weight < self.weight * WEIGHT_SCALE:
            return "slow_start"
        return "up"

    def gauge(self) -> UpstreamGauge:
        return UpstreamGauge(self.upstream.name, self.address, self.active, len(self.idle),
                             self.state_name(_monotonic()), self.eff_weight, self.connects,
                             self.reuses, self.failures, self.ejections, self.retries,
                             len(self.waiters), self.tunnels)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_options(cfg: UpstreamConfig) -> tuple[tuple[int, int, int], ...]:
    """The setsockopt calls of every new upstream socket: TCP_NODELAY, and keep-alive
    probes when ``tcp_keepalive`` is on."""
    opts = [(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)]
    ka = cfg.tcp_keepalive
    if ka.enabled:
        opts += [(pysocket.SOL_SOCKET, pysocket.SO_KEEPALIVE, 1),
                 (pysocket.IPPROTO_TCP, pysocket.TCP_KEEPIDLE, max(1, int(ka.idle))),
                 (pysocket.IPPROTO_TCP, pysocket.TCP_KEEPINTVL, max(1, int(ka.interval))),
                 (pysocket.IPPROTO_TCP, pysocket.TCP_KEEPCNT, ka.count)]
    return tuple(opts)


class TLSServer(Server):
    """A server reached through TLS: the handshake after connect (within
    connect_timeout), and the session of its last connection, offered on the next so
    that reconnects resume (one per server and worker, like nginx's
    proxy_ssl_session_reuse)."""

    __slots__ = ("tls_ctx", "tls_name", "tls_session", "tls_full", "tls_resumed")

    def __init__(self, upstream, address: str, weight: int, cfg: UpstreamConfig,
                 tls_ctx, dns_name: str = ""):
        super().__init__(upstream, address, weight, cfg)
        self.tls_ctx = tls_ctx
        self.tls_name = server_name(cfg.tls, dns_name or self.host)
        self.tls_session = None  # the session the next connection offers
        self.tls_full = 0  # handshakes (counters since the worker started)
        self.tls_resumed = 0

    def _tls_socket(self):
        """A connected TLS socket (counted in active and in the handshake counters)."""
        sock = self._open()
        try:
            ssock = handshake(sock, self.tls_ctx, self.tls_name, self.tls_session,
                              self.connect_timeout)
        except BaseException:
            self._not_connected()
            raise
        if ssock.session_reused:
            self.tls_resumed += 1
        else:
            self.tls_full += 1
        return ssock

    def _connect(self) -> UpstreamConn:
        ssock = self._tls_socket()
        self.connects += 1
        conn = TLSUpstreamConn(ssock, self)
        conn.fresh = self.cfg.tls.session_reuse  # else its session is never kept
        return conn

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        if conn.fresh and reusable:
            # after a whole response: TLS 1.3 tickets arrive after the handshake
            conn.fresh = False
            session = conn.sslobj.session
            if session is not None and (session.has_ticket or session.id):
                self.tls_session = session
        super().release(conn, reusable)

    def gauge(self) -> UpstreamGauge:
        g = super().gauge()
        g.tls_full = self.tls_full
        g.tls_resumed = self.tls_resumed
        return g
