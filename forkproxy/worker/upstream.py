"""Upstream servers, balancing, health and per-worker connection pools.

Everything here is per worker process (no sharing, no locks), except the active health
verdicts, which the helper process publishes in the shared health table
(forkproxy/shm/health.py) and each worker reads in :meth:`Upstream.refresh`.

Pool tiers, per worker and server (nginx's ``keepalive*`` plus HAProxy's ``maxconn``):

* ``keepalive``: idle connections kept; a LIFO list, so the most recently used
  (warmest) socket is reused and the oldest age out;
* ``max_connections``: connections open at once, lent and idle; a request that finds
  them all lent waits up to ``queue_timeout`` (:class:`PoolTimeout`: the client gets 503);
* ``keepalive_timeout`` (idle), ``keepalive_requests`` (uses), ``max_connection_age``
  (since connect): a connection past any of them is closed instead of reused, and idle
  ones are swept once a second (no CLOSE_WAIT pile-up when origins close first);
* TCP keep-alive probes on every upstream socket (``tcp_keepalive``).

Server state in a worker (what /status shows, see :meth:`Server.gauge`):

* ``down``: the active health check says so (shared by all workers);
* ``ejected``: passive health: ``max_fails`` failures within ``fail_timeout`` in this
  worker took it out for ``fail_timeout`` (nginx's semantics, per worker like nginx
  without a shared zone; never for a single-server upstream, also like nginx);
* ``slow_start``: back after down/ejected, its effective weight ramps up linearly over
  ``slow_start`` (from when the check saw it up: the same ramp in every worker);
* ``up``.

Hot path cost: ``pick`` (one pass over the servers), ``acquire``/``release`` (a list pop
and append), ``failed`` only on failures. Health and weights change in ``refresh``,
every SWEEP_INTERVAL, not per request.
"""

from __future__ import annotations

import socket as pysocket
import time
from collections import deque

from gevent import socket
from gevent.event import Event

from forkproxy.config import UpstreamConfig, parse_hostport
from forkproxy.context import WEIGHT_SCALE, UpstreamGauge
from forkproxy.hashing import hash64
from forkproxy.shm.health import DOWN, STATE, UP, WORDS, server_key
from forkproxy.tls.client import client_context, handshake, server_name
from forkproxy.worker.balancer import KeySpec, Peer, RetryBudget, make_balancer
from forkproxy.worker.upconn import TLSUpstreamConn, UpstreamConn

#: idle connections are swept (timeouts, age) this often
REAP_INTERVAL = 1.0

_monotonic = time.monotonic


class PoolTimeout(Exception):
    """max_connections were all lent for queue_timeout: no connection for this request."""


class Server(Peer):
    """One upstream server with its idle pool, health and balancing state."""

    __slots__ = ("upstream", "host", "port", "address", "idle", "cfg", "family",
                 "connect_timeout", "head_timeout", "keepalive_timeout", "max_age",
                 "max_conns", "waiters", "connects", "reuses", "failures", "fails",
                 "fail_start", "ejected_until", "ejections", "retries", "hidx", "hdown",
                 "hsince", "ramp_start", "tunnels")

    def __init__(self, upstream: Upstream, address: str, weight: int, cfg: UpstreamConfig):
        super().__init__(weight, hash64(address.encode(), b"fp-peer"))
        self.upstream = upstream
        self.host, self.port = parse_hostport(address)
        self.address = address
        self.family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
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
        """A connected TCP socket (TCP_NODELAY, keep-alive probes), counted in active."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        self.active += 1  # counted while connecting: max_connections holds across the wait
        try:
            sock.connect((self.host, self.port))
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
            ka = self.cfg.tcp_keepalive
            if ka.enabled:
                sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_KEEPALIVE, 1)
                sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_KEEPIDLE, max(1, int(ka.idle)))
                sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_KEEPINTVL,
                                max(1, int(ka.interval)))
                sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_KEEPCNT, ka.count)
        except BaseException:
            sock.close()
            self._not_connected()
            raise
        sock.settimeout(None)  # later steps are bounded by the connection's deadline
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


class TLSServer(Server):
    """A server reached through TLS: the handshake after connect (within
    connect_timeout), and the session of its last connection, offered on the next so
    that reconnects resume (one per server and worker, like nginx's
    proxy_ssl_session_reuse)."""

    __slots__ = ("tls_ctx", "tls_name", "tls_session", "tls_full", "tls_resumed")

    def __init__(self, upstream: Upstream, address: str, weight: int, cfg: UpstreamConfig,
                 tls_ctx):
        super().__init__(upstream, address, weight, cfg)
        self.tls_ctx = tls_ctx
        self.tls_name = server_name(cfg.tls, self.host)
        self.tls_session = None  # the session the next connection offers
        self.tls_full = 0  # handshakes (counters since the worker started)
        self.tls_resumed = 0

    def _connect(self) -> UpstreamConn:
        sock = self._open()
        try:
            ssock = handshake(sock, self.tls_ctx, self.tls_name, self.tls_session,
                              self.connect_timeout)
        except BaseException:
            self._not_connected()
            raise
        self.connects += 1
        if ssock.session_reused:
            self.tls_resumed += 1
        else:
            self.tls_full += 1
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


class Upstream:
    """A named group of servers, its balancer, retry policy and health settings."""

    split = False  # see forkproxy.worker.balancer.Split (a route's target is one or the other)

    __slots__ = ("name", "servers", "cfg", "balancer", "keyspec", "single", "max_fails",
                 "fail_timeout", "slow_start", "retries", "retry_connect", "retry_kinds",
                 "retry_statuses", "budget", "health", "next_reap", "tunnel_timeout",
                 "total_weight", "watch")

    def __init__(self, name: str, cfg: UpstreamConfig, health=None, base: str = "."):
        self.name = name
        self.cfg = cfg
        if cfg.tls is None:
            self.servers = [Server(self, s.address, s.weight, cfg) for s in cfg.servers]
        else:
            ctx = client_context(cfg.tls, base)  # one per upstream: its servers' sessions
            self.servers = [TLSServer(self, s.address, s.weight, cfg, ctx)
                            for s in cfg.servers]
        self.total_weight = sum(s.weight for s in self.servers)
        self.single = len(self.servers) == 1
        self.balancer = make_balancer(cfg.balance)
        self.keyspec = KeySpec(cfg.hash, b"fp-balance") if cfg.balance == "hash" else None
        self.max_fails = cfg.max_fails
        self.fail_timeout = cfg.fail_timeout
        self.slow_start = cfg.slow_start
        self.retries = cfg.retries
        on = set(cfg.retry_on)
        self.retry_connect = "connect_failure" in on
        kinds = set()
        if "reset" in on:
            kinds.add("reset")
        if "timeout" in on:
            kinds.add("timeout")
        statuses = frozenset(int(s) for s in on if s.isdigit())
        if statuses:
            kinds.add("status")
        self.retry_kinds = frozenset(kinds)
        self.retry_statuses = statuses or None
        self.budget = RetryBudget(cfg.retry_budget, cfg.retry_budget_min)
        self.tunnel_timeout = cfg.tunnel_timeout
        self.next_reap = 0.0
        self.health = None
        # refresh() has per-server work to do (verdicts, ejections, ramps): skipped otherwise
        self.watch = cfg.health_check is not None or cfg.slow_start > 0
        if health is not None and cfg.health_check is not None:
            self.health = health.q
            index = health.index()
            for s in self.servers:
                s.hidx = index.get(server_key(name, s.address), -1)

    def pick(self, key: int | None = None, exclude=None) -> Server | None:
        if self.single:
            s = self.servers[0]
            return s if s.usable and (exclude is None or s not in exclude) else None
        return self.balancer.pick(self.servers, exclude, key)

    def refresh(self, now: float) -> None:
        """Apply health verdicts, ejection ends and slow start; sweep idle connections.

        Called by the worker every SWEEP_INTERVAL (not per request)."""
        if self.watch:
            self._apply(now)
        if now >= self.next_reap:
            self.next_reap = now + REAP_INTERVAL
            for s in self.servers:
                s.reap(now)

    def _apply(self, now: float) -> None:
        q = self.health
        slow = self.slow_start
        for s in self.servers:
            since = 0.0
            if s.hidx >= 0 and q is not None:
                word = q[s.hidx * WORDS + STATE]
                st = word & 3
                down = st == DOWN
                if st == UP:
                    since = (word >> 2) / 1000.0
                    if since != s.hsince:
                        s.hsince = since
                        if since and s.ejected_until:
                            s.ejected_until = 0.0  # a check that saw it recover unejects it
                if down != s.hdown:
                    s.hdown = down
                    if down:
                        s.close_idle()
            if s.ejected_until and now >= s.ejected_until:
                s.ejected_until = 0.0
                s.ramp_start = now
            usable = not s.hdown and not s.ejected_until
            full = s.weight * WEIGHT_SCALE
            eff = full
            if slow and usable:
                start = max(since, s.ramp_start)
                if start and now - start < slow:
                    eff = max(1, int(full * (now - start) / slow))
                elif s.ramp_start:
                    s.ramp_start = 0.0
            s.usable = usable
            s.eff_weight = eff
        if q is None and not slow:  # only passive ejections to watch: until they end
            self.watch = any(s.ejected_until for s in self.servers)

    def available(self) -> bool:
        return any(s.usable for s in self.servers)

    def close_idle(self) -> None:
        for s in self.servers:
            s.close_idle()


def build_upstreams(cfg_upstreams: dict[str, UpstreamConfig], health=None,
                    base: str = ".") -> dict[str, Upstream]:
    """The worker's upstreams; ``base``: the directory TLS file names are relative to."""
    return {name: Upstream(name, ucfg, health, base) for name, ucfg in cfg_upstreams.items()}
